"""Admin calls from the CLI straight to workers (found through discovery), with the admin token.

Exit codes for commands built on it: 0 done everywhere asked; 1 a worker refused or failed (each
says why); 2 usage or connection errors (no service, NATS not reached within --timeout, no such
worker).
"""

from __future__ import annotations

import json
from typing import Any

import typer

from dynvllm.settings import Settings

#: Seconds a command waits for NATS before it gives up (a service, by contrast, waits forever).
DEFAULT_TIMEOUT = 10.0


def timeout_option() -> Any:
    """The `--timeout` of every command that reaches a running service through NATS."""
    return typer.Option(
        DEFAULT_TIMEOUT, "--timeout", min=0.1, help="Seconds to wait for NATS before giving up (exit 2)."
    )


async def call_workers(
    settings: Settings, endpoint: str, payload: dict, pick: Any, timeout: float | None = None
) -> list[tuple[Any, Any]]:
    """(instance, result or error message) for each worker `pick(instances)` returns."""
    import asyncio

    from dynvllm.runtime import nats as natsrt
    from dynvllm.runtime.discovery import Watcher
    from dynvllm.runtime.errors import RemoteError
    from dynvllm.runtime.streams import StreamClientPool, unary

    rt = settings.runtime
    nc = await natsrt.connect(rt, name="dynvllm-lora", give_up_after=timeout)
    pool = StreamClientPool()
    try:
        watcher = Watcher(nc, rt.namespace, rt.lease_ttl)
        await watcher.start()
        await asyncio.sleep(0.6)  # one announce round
        await watcher.stop()
        workers = [i for i in watcher.instances("worker") if endpoint in i.endpoints]
        targets = pick(workers)

        async def one(inst: Any) -> tuple[Any, Any]:
            try:
                conn = await pool.get(inst.id, inst.host, inst.port)
                return inst, await unary(conn, endpoint, payload, timeout=900)
            except RemoteError as exc:
                return inst, f"{exc.kind}: {exc.message}"
            except TimeoutError:
                return inst, "timed out"

        return list(await asyncio.gather(*(one(i) for i in targets)))
    finally:
        await pool.close()
        await natsrt.close(nc)


def run(
    settings: Settings, endpoint: str, payload: dict, pick: Any, timeout: float = DEFAULT_TIMEOUT
) -> list[tuple[Any, Any]]:
    from dynvllm.cli.failure import fail as _fail
    from dynvllm.cli.target import use_service
    from dynvllm.runtime import nats as natsrt

    use_service(settings)
    try:
        token = settings.runtime.admin_token
        payload = {**payload, "admin_token": token.get_secret_value() if token else None}
        return natsrt.run(call_workers(settings, endpoint, payload, pick, timeout))
    except natsrt.NatsUnavailable as exc:
        raise _fail(str(exc)) from None
    except ValueError as exc:
        raise _fail(str(exc)) from None


def report(results: list[tuple[Any, Any]], as_json: bool) -> None:
    failed = [r for _, r in results if isinstance(r, str)]
    if as_json:
        typer.echo(json.dumps([{"worker": i.id, "result": r} for i, r in results], indent=2))
    else:
        for inst, r in results:
            line = r if isinstance(r, str) else f"{r.get('status')} {r.get('name')}"
            typer.echo(f"{inst.id}: {line}", err=isinstance(r, str))
    raise typer.Exit(1 if failed else 0)
