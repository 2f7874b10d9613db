"""The terminal side shared by every command: one console, one error exit.

A leaf module (rich + typer only, no torch) so that each package's command module can import it
without importing the CLI that registers them.
"""
from __future__ import annotations

import functools

import typer
from rich.console import Console
from rich.markup import escape

from .errors import CgilError

console = Console()
if not console.is_terminal:  # logs and pipes: wide enough that result tables are never truncated
    console = Console(width=120)


def fail(message: str, code: int = 2) -> None:
    """Print `error: message` on stderr (user text is never read as markup) and exit."""
    from .names import printable  # one line: control characters of names or paths are shown as escapes

    Console(stderr=True).print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


def guarded(fn):
    """Turn CgilError into a one-line message and exit code 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CgilError as e:
            fail(str(e))

    return wrapper
