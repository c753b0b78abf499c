"""Errors that reach a person: each names what was wrong and how to fix it, in one line."""


class InputError(ValueError):
    """Bad input from a user: a path, an argument or a file that cannot be used as given.

    The CLI prints ``str(error)`` as a single line and exits with status 2, so the message must name the
    argument (or file) and the fix.
    """

    def __init__(self, argument: str, problem: str, fix: str):
        self.argument = argument
        self.problem = problem
        self.fix = fix
        super().__init__(f"{argument}: {problem}; {fix}")
