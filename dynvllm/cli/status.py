"""`dynvllm status`: instances by role, their models and stages, and their load."""

from __future__ import annotations

import json

import typer

from dynvllm.cli.calls import timeout_option
from dynvllm.cli.options import with_settings
from dynvllm.settings import Settings


async def collect(settings: Settings, wait: float = 1.2, timeout: float | None = None) -> list[dict]:
    import asyncio

    from dynvllm.runtime import nats as natsrt
    from dynvllm.runtime.discovery import Watcher
    from dynvllm.runtime.events import LOAD, EventBus

    rt = settings.runtime
    nc = await natsrt.connect(rt, name="dynvllm-status", give_up_after=timeout)
    try:
        load: dict[str, dict] = {}

        async def on_load(ev) -> None:
            load[ev.instance_id] = {
                "running": ev.running,
                "waiting": ev.waiting,
                "kv_used_blocks": ev.kv_used_blocks,
                "kv_total_blocks": ev.kv_total_blocks,
            }

        watcher = Watcher(nc, rt.namespace, rt.lease_ttl)
        await EventBus(nc, rt.namespace).subscribe(LOAD, on_load)
        await watcher.start()
        await asyncio.sleep(wait)  # one announce round plus a slow worker's load report
        await watcher.stop()
        rows = []
        for inst in sorted(watcher.instances(), key=lambda i: (i.component, i.role, i.id)):
            rows.append(
                {
                    "id": inst.id,
                    "component": inst.component,
                    "role": inst.role,
                    "address": f"{inst.host}:{inst.port}",
                    "model": inst.card.get("model"),
                    "stage": inst.card.get("stage"),
                    "pid": inst.pid,
                    "metrics": f"{inst.host}:{inst.card['metrics_port']}"
                    if inst.card.get("metrics_port")
                    else None,
                    "restarts": inst.card.get("restarts", 0),
                    "ranks": int(inst.card.get("dp_size") or 1),
                    "load": load.get(inst.id, {}),
                }
            )
        return rows
    finally:
        await nc.close()


_HEADERS = (
    "role",
    "id",
    "model",
    "stage",
    "address",
    "metrics",
    "run",
    "wait",
    "kv used",
    "ranks",
    "restarts",
)
_TABLE_WIDTH = 150  # below this a table would squeeze ids and addresses


async def worker_stats(row: dict) -> dict:
    """A worker's stats endpoint (in-flight calls, KV-connector counters, ...), for a row of
    `collect` (its id and address)."""
    from dynvllm.runtime.streams import Connection, unary

    host, port = row["address"].split(":")
    conn = Connection(host, int(port), row["id"])
    await conn.open()
    try:
        return await unary(conn, "stats", None)
    finally:
        await conn.close()


def _cells(r: dict) -> list[str]:
    return [
        r["role"] or r["component"],
        r["id"],
        r["model"] or "-",
        r["stage"] or "-",
        r["address"],
        r["metrics"] or "-",
        str(r["load"].get("running", "-")),
        str(r["load"].get("waiting", "-")),
        kv_used(r["load"]),
        str(r["ranks"]),
        str(r["restarts"]),
    ]


def kv_used(load: dict) -> str:
    """'37% (120/324)' from a load report: blocks in use of the engine's KV cache."""
    total = load.get("kv_total_blocks")
    if not total:
        return "-"
    used = load.get("kv_used_blocks", 0)
    return f"{100 * used / total:.0f}% ({used}/{total})"


def register(app: typer.Typer) -> None:
    @app.command("status")
    @with_settings("runtime")
    def status_cmd(
        settings: Settings,
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
        timeout: float = timeout_option(),
    ) -> None:
        """Show the instances of a running service (--nats-url, or this machine's one `serve`:
        see `dynvllm services`)."""
        from dynvllm.cli.failure import fail as _fail
        from dynvllm.cli.target import use_service
        from dynvllm.runtime import nats as natsrt

        use_service(settings)
        try:
            rows = natsrt.run(collect(settings, timeout=timeout))
        except natsrt.NatsUnavailable as exc:
            raise _fail(str(exc)) from None
        if as_json:
            typer.echo(json.dumps({"nats_url": settings.runtime.nats_url, "instances": rows}, indent=2))
            return
        from rich.console import Console
        from rich.table import Column, Table

        console = Console()
        title = f"dynvllm @ {settings.runtime.nats_url} (namespace {settings.runtime.namespace})"
        cells = [_cells(r) for r in rows]
        if console.width >= _TABLE_WIDTH:
            table = Table(*(Column(h, overflow="fold") for h in _HEADERS), title=title)
            for c in cells:
                table.add_row(*c)
            console.print(table)
        else:  # too narrow for a table: one block per instance, nothing cut short
            console.print(title, highlight=False)
            for c in cells:
                console.print()
                for h, v in zip(_HEADERS, c, strict=True):
                    console.print(f"  [bold]{h:>8}[/] {v}", highlight=False, overflow="fold")
        if not rows:
            console.print("no instances registered")
