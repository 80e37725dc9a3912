"""How a command fails: one red line on stderr and an exit code (2 unless told)."""

from __future__ import annotations

import typer


def fail(message: str, code: int = 2) -> typer.Exit:
    from rich.console import Console

    # One line, however narrow the terminal: scripts grep it, and the terminal wraps it anyway.
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)
