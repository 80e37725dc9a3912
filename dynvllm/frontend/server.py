"""The frontend process: discovery + router + HTTP server on one event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from dynvllm import cores, logs
from dynvllm.frontend.app import FrontendApp
from dynvllm.frontend.models import ModelRegistry
from dynvllm.frontend.observe import RequestObserver
from dynvllm.frontend.peers import RouterPeers
from dynvllm.frontend.processes import REUSEPORT_ENV, reuseport_socket, run_processes
from dynvllm.frontend.routing import Router
from dynvllm.runtime import nats as natsrt
from dynvllm.runtime.discovery import Instance, Watcher
from dynvllm.runtime.streams import StreamClientPool
from dynvllm.settings import Settings
from dynvllm.tracing import TracingUnavailable
from dynvllm.tracing import setup as setup_tracing

log = logging.getLogger("dynvllm.frontend")


async def serve_frontend(settings: Settings) -> int:
    import uvicorn

    rt, fe = settings.runtime, settings.frontend
    nc = await natsrt.connect(rt, name="dynvllm-frontend")
    watcher = Watcher(nc, rt.namespace, rt.lease_ttl)
    models = ModelRegistry(watcher, fe.aliases(), settings)
    pool = StreamClientPool()
    router = Router(settings)
    if router.policy.keeps_index:
        from dynvllm.router.index import tune_gc

        tune_gc()

    # A worker that says goodbye is draining: its open streams finish, new requests go elsewhere.
    # One whose lease expired gets no new requests; it may be unreachable without a reset, so its
    # streams fail (and migrate) once its connection stays quiet for a lease after the expiry.
    watcher.on_remove.append(lambda inst: router.forget(inst.id))

    def ranks(inst: Instance) -> None:
        router.set_ranks(
            inst.id, int(inst.card.get("dp_start_rank") or 0), int(inst.card.get("dp_size") or 1)
        )

    watcher.on_add.append(ranks)
    watcher.on_update.append(ranks)
    watcher.on_expire.append(
        lambda inst: pool.drop_when_silent(inst.id, rt.lease_ttl, lambda iid: watcher.get(iid) is not None)
    )
    await watcher.start()
    # Other frontends of the namespace: shared decisions, and the index loaded from a live one.
    peers = RouterPeers(nc, rt, router)
    await peers.start(settings.router.router_share_load)
    admin = rt.admin_token.get_secret_value() if rt.admin_token else None
    frontend = FrontendApp(models, pool, router, settings, admin, settings.router.lora_on_demand)
    await frontend.gate.watch(nc, rt.namespace)
    tracing = setup_tracing(rt.otlp_traces_endpoint, "dynvllm-frontend")
    RequestObserver(frontend.metrics, tracing).install(frontend.path)
    # Tenants' limits divided with the other frontend processes before the first request.
    shared = await frontend.tenants.start_sharing(nc, settings) if frontend.tenants else None
    for surface in frontend.surfaces:
        await surface.start(nc, rt.namespace)
    config = uvicorn.Config(
        frontend.app,
        host=fe.http_host,
        port=fe.http_port,
        log_level=fe.uvicorn_log_level,
        log_config=logs.uvicorn_config(rt.log_format),
        access_log=False,
        ssl_keyfile=str(fe.ssl_keyfile) if fe.ssl_keyfile else None,
        ssl_certfile=str(fe.ssl_certfile) if fe.ssl_certfile else None,
        loop="none",
        http="httptools",
        timeout_graceful_shutdown=60,
        timeout_keep_alive=75,  # outlive typical client pools; 5 s races with reuse
        lifespan="off",
        proxy_headers=False,  # nothing reads the client address; a middleware layer less per request
    )
    server = uvicorn.Server(config)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        frontend.draining = True
        server.should_exit = True

    # uvicorn (since 0.29) sets its own handlers with signal.signal while it serves; these still
    # run, since the signal also reaches the loop through its wakeup fd.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    sockets = None
    if os.environ.get(REUSEPORT_ENV):
        # Siblings already serve this port: connections reach this process as soon as it listens,
        # so it first hears every worker's heartbeat once, and never answers "no such model" for
        # one they serve (a process restarted after a crash, under load).
        await asyncio.sleep(rt.heartbeat_interval)
        sockets = [reuseport_socket(fe.http_host, fe.http_port)]
    task = asyncio.create_task(server.serve(sockets=sockets))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    if server.started:
        port = server.servers[0].sockets[0].getsockname()[1]
        scheme = "https" if fe.ssl_certfile else "http"
        print(f"dynvllm frontend listening on {scheme}://{fe.http_host}:{port}", file=sys.stderr, flush=True)
    await task
    for surface in frontend.surfaces:
        await surface.stop()
    if shared is not None:
        await shared.stop()
    await frontend.gate.unwatch()
    await peers.stop()
    await watcher.stop()
    await pool.close()
    await natsrt.close(nc)
    if tracing is not None:
        tracing.shutdown()
    return 0


def run_frontend(settings: Settings) -> int:
    processes = cores.process_count(settings.frontend.http_workers, cores.usable_cores())
    if processes > 1:
        return run_processes(settings, processes)
    logs.setup(settings.runtime.log_level, settings.runtime.log_format, "frontend")
    try:
        return int(natsrt.run(serve_frontend(settings)) or 0)
    except TracingUnavailable as exc:
        log.error("%s", exc)
        return 2
