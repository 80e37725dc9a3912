"""`dynvllm lora load|unload|list`: LoRA adapters on a running service's workers.

Exit codes: 0 done everywhere asked; 1 at least one worker refused or failed (each says why);
2 usage or connection errors (no service, no such worker, no worker holds the adapter).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import typer

from dynvllm.cli.calls import report as _report
from dynvllm.cli.calls import run as _run
from dynvllm.cli.calls import timeout_option
from dynvllm.cli.options import with_settings
from dynvllm.settings import Settings

lora_app = typer.Typer(help="Load, unload and list LoRA adapters on a running service.", no_args_is_help=True)


def _targets(worker: str | None, all_workers: bool) -> Callable[[list[Any]], list[Any]]:
    def pick(workers: list[Any]) -> list[Any]:
        if worker:
            chosen = [w for w in workers if w.id == worker]
            if not chosen:
                known = ", ".join(w.id for w in workers) or "none"
                raise ValueError(f"no worker {worker!r} serves adapters; workers: {known}")
            return chosen
        if not workers:
            raise ValueError("no worker of this service serves adapters")
        return workers

    if worker and all_workers:
        raise typer.BadParameter("give --worker ID or --all, not both")
    return pick


@lora_app.command("load")
@with_settings("runtime")
def load_cmd(
    settings: Settings,
    name: str = typer.Argument(..., metavar="NAME", help="Adapter name; clients use it as the model."),
    source: str = typer.Option(
        ..., "--source", help="Folder, file://, hf://org/repo[@rev] or s3://bucket/prefix."
    ),
    worker: str | None = typer.Option(None, "--worker", help="Load on this worker only."),
    all_workers: bool = typer.Option(False, "--all", help="Load on every worker (the default)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    timeout: float = timeout_option(),
) -> None:
    """Load an adapter on workers (every worker unless --worker)."""
    from dynvllm import protocol

    results = _run(
        settings,
        protocol.LORA_LOAD,
        {"name": name, "source": source},
        _targets(worker, all_workers),
        timeout,
    )
    _report(results, as_json)


@lora_app.command("unload")
@with_settings("runtime")
def unload_cmd(
    settings: Settings,
    name: str = typer.Argument(..., metavar="NAME", help="Adapter name."),
    worker: str | None = typer.Option(None, "--worker", help="Unload on this worker only."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    timeout: float = timeout_option(),
) -> None:
    """Unload an adapter from the workers that hold it (requests using it finish first)."""
    from dynvllm import protocol

    def pick(workers: list[Any]) -> list[Any]:
        holders = [
            w for w in workers if name in (w.card.get("loras") or ()) and (not worker or w.id == worker)
        ]
        if not holders:
            raise ValueError(f"no worker holds adapter {name!r}")
        return holders

    _report(_run(settings, protocol.LORA_UNLOAD, {"name": name}, pick, timeout), as_json)


@lora_app.command("list")
@with_settings("runtime")
def list_cmd(
    settings: Settings,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    timeout: float = timeout_option(),
) -> None:
    """Adapters on every worker, with where each came from."""
    from dynvllm import protocol

    results = _run(settings, protocol.LORA_LIST, {}, lambda workers: workers, timeout)
    rows = [
        {"name": a["name"], "worker": inst.id, "model": inst.card.get("model"), "source": a.get("source")}
        for inst, adapters in results
        if isinstance(adapters, list)
        for a in adapters
    ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("adapter", "worker", "base model", "source", title="LoRA adapters")
    for r in rows:
        table.add_row(r["name"], r["worker"], str(r["model"]), str(r["source"]))
    Console().print(table)
    if not rows:
        Console().print("no adapters loaded")


def register(app: typer.Typer) -> None:
    app.add_typer(lora_app, name="lora")
