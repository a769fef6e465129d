"""Errors -> one line on stderr and an exit code (a table, not an except chain per command)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from sdaccel.errors import SdaccelError

EXIT_INTERRUPTED = 130


@contextmanager
def reported_errors(console: Console) -> Iterator[None]:
    """Show a user error as `Error: ...` and exit with its code; never a traceback."""
    try:
        yield
    except SdaccelError as exc:
        console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None
