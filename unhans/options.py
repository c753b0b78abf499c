"""Values the commands parse from their options the same way: KEY=VALUE settings and artifact positions."""

from __future__ import annotations

import json

from .core.errors import InputError


def parse_options(pairs: tuple[str, ...], flag: str) -> dict:
    """``key=value`` pairs into a dict; values are read as JSON where they parse (numbers, lists), else text."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(flag, f"{pair!r} is not KEY=VALUE", f"write e.g. {flag} size=5")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def parse_position(position: str):
    """``--position``: a named place, or ROW,COL as a tuple."""
    if "," not in position:
        return position
    try:
        return tuple(int(v) for v in position.split(","))
    except ValueError:
        raise InputError("--position", f"{position!r} is not ROW,COL", "write e.g. --position 20,20") from None
