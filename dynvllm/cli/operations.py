"""`dynvllm kv clear` and `dynvllm worker sleep|wake ID`: engine operations on a running service."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from dynvllm.cli.calls import report, run, timeout_option
from dynvllm.cli.options import with_settings
from dynvllm.settings import Settings

kv_app = typer.Typer(help="KV cache operations on a running service.", no_args_is_help=True)
worker_app = typer.Typer(help="Operations on one worker of a running service.", no_args_is_help=True)


def _one(worker: str) -> Callable[[list[Any]], list[Any]]:
    def pick(workers: list[Any]) -> list[Any]:
        chosen = [w for w in workers if w.id == worker]
        if not chosen:
            raise ValueError(f"no worker {worker!r}; workers: {', '.join(w.id for w in workers) or 'none'}")
        return chosen

    return pick


@kv_app.command("clear")
@with_settings("runtime")
def clear_cmd(
    settings: Settings,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    timeout: float = timeout_option(),
) -> None:
    """Clear the prefix cache of every worker (routers drop those blocks from their index)."""
    from dynvllm import protocol

    def every(workers: list[Any]) -> list[Any]:
        if not workers:
            raise ValueError("no worker of this service can clear its KV cache")
        return workers

    report(run(settings, protocol.CLEAR_KV, {}, every, timeout), as_json)


@worker_app.command("sleep")
@with_settings("runtime")
def sleep_cmd(
    settings: Settings,
    worker: str = typer.Argument(..., metavar="WORKER", help="Worker id (see `dynvllm status`)."),
    level: int = typer.Option(1, "--level", min=1, max=2, help="1 offloads weights, 2 discards them."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    timeout: float = timeout_option(),
) -> None:
    """Take a worker out of routing and put its engine to sleep (frees accelerator memory)."""
    from dynvllm import protocol

    report(run(settings, protocol.SLEEP, {"level": level}, _one(worker), timeout), as_json)


@worker_app.command("wake")
@with_settings("runtime")
def wake_cmd(
    settings: Settings,
    worker: str = typer.Argument(..., metavar="WORKER", help="Worker id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    timeout: float = timeout_option(),
) -> None:
    """Wake a sleeping worker; it serves requests again."""
    from dynvllm import protocol

    report(run(settings, protocol.WAKE, {}, _one(worker), timeout), as_json)


def register(app: typer.Typer) -> None:
    app.add_typer(kv_app, name="kv")
    app.add_typer(worker_app, name="worker")
