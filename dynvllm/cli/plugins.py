"""`dynvllm plugins`: what is installed, read from metadata without importing any plugin."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer


def register(app: typer.Typer) -> None:
    @app.command("plugins")
    def plugins_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """List installed roles and connectors (group, name, target, distribution)."""
        from dynvllm import registry

        rows = [p for g in registry.GROUPS for p in registry.installed(g)]
        if as_json:
            typer.echo(json.dumps([asdict(p) for p in rows], indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table("group", "name", "target", "distribution")
        for p in rows:
            table.add_row(p.group, p.name, p.target, f"{p.distribution} {p.version}")
        Console().print(table)
