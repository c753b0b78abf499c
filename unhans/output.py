"""What the command line prints: progress and errors on stderr, result tables through one helper."""

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)  # progress and notes
results = Console()  # what a command produced: tables a script may read


def print_table(title: str, rows: dict) -> None:
    """A two-column table of named figures (floats to 4 significant digits)."""
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right", overflow="fold")
    for key, value in rows.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    results.print(table)


def warn(message: str) -> None:
    """A warning a person must read (a result that may not be trusted), on stderr in one line."""
    console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
