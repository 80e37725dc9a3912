"""The worker process: one vLLM AsyncLLM in a role, registered in discovery, served over sockets.

Lifecycle: build the engine, serve, register under a lease; on SIGTERM deregister first, let
in-flight requests finish within `drain_timeout`, abort the rest, shut the engine down. A
watcher process kills our process group if we die abruptly, so no engine process outlives us.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

from dynvllm import heap, logs, protocol, tracing
from dynvllm.envnames import RESTARTS_ENV
from dynvllm.process import become_group_leader, private_ipc_dir, start_group_reaper
from dynvllm.runtime import nats as natsrt
from dynvllm.runtime.discovery import Instance, Lease
from dynvllm.runtime.events import LOAD, EventBus, LoadMetrics
from dynvllm.runtime.streams import Inflight, StreamServer
from dynvllm.settings import Settings
from dynvllm.worker.adapters import AdapterManager
from dynvllm.worker.operations import EngineOperations
from dynvllm.worker.role import EngineHandle, Role
from dynvllm.worker.stats import SchedulerSnapshot

log = logging.getLogger("dynvllm.worker")
COMPONENT = "worker"


class Worker:
    def __init__(self, settings: Settings, role_name: str, role: Role) -> None:
        self.settings = settings
        self.role_name = role_name
        self.role = role
        self.engine: Any = None
        self.snapshot = SchedulerSnapshot()
        self.server: StreamServer | None = None
        self.lease: Lease | None = None
        self.nc: Any = None
        self.stopping = asyncio.Event()
        self.engine_dead = False
        self.last_canary: dict[str, Any] = {"ok": None, "at": 0.0, "seconds": None}
        self.instance: Instance | None = None
        self.relays: list[Any] = []
        self.inflight = Inflight()
        self.adapters: AdapterManager | None = None
        self.operations: EngineOperations | None = None
        self.restarts = int(os.environ.get(RESTARTS_ENV, "0") or 0)
        self.metrics_server: Any = None
        self.metrics_port: int | None = None
        self.tracing: tracing.Tracing | None = None

    # ---- handlers shared by every role ------------------------------------------------
    async def health(self, payload: Any = None) -> dict:
        return {
            "ok": not self.engine_dead and self.last_canary["ok"] is not False,
            "canary": self.last_canary,
            "inflight": self.inflight.count,
            "draining": self.stopping.is_set(),
        }

    async def stats(self, payload: Any = None) -> dict:
        return self.stats_now()

    def stats_now(self) -> dict:
        """Plain reads only: the metrics thread calls it too."""
        s = self.snapshot
        return {
            "inflight": self.inflight.count,
            "running": s.running,
            "waiting": s.waiting,
            "kv_usage": s.kv_usage,
            "prefix_queries": s.prefix_queries,
            "prefix_hits": s.prefix_hits,
            "kv_events_relayed": sum(r.relay_seq for r in self.relays),
            "ranks": s.ranks_view(),
            "kv_transfer": s.kv_transfer,
            "draining": int(self.stopping.is_set()),
            "sleeping": self.operations.sleeping if self.operations else 0,
            "restarts": self.restarts,
        }

    # ---- lifecycle --------------------------------------------------------------------
    def _build_engine(self) -> None:
        from dynvllm import registry
        from dynvllm.worker.kv_relay import bind_relays

        self.engine = registry.load(registry.ENGINES, self.settings.worker.engine)()
        endpoint = replay = None
        if self.settings.publishes_kv_events():
            # Relays forward the engine's events to routers over NATS.
            bus = EventBus(self.nc, self.settings.runtime.namespace)
            endpoint, replay, self.relays = bind_relays(bus, self.engine.local_ranks(self.settings))
        self.engine.start(
            self.settings, self.role.engine_overrides(self.settings), self.snapshot, endpoint, replay
        )

    def _card(self) -> dict:
        eng = self.settings.engine
        return {
            "model": eng.served_model_name or eng.model,
            "source": eng.model,
            **self.engine.card(),
            "engine": self.engine.kind,
            "role": self.role_name,
            "stage": self.role.stage,
            "terminal": self.role.terminal,
            "loras": sorted(self.adapters.loaded) if self.adapters else [],
            # Where each came from, so any frontend can load it again elsewhere (--lora-on-demand).
            "lora_sources": dict(self.adapters.known) if self.adapters else {},
            "lora_capacity": self.engine.adapter_capacity(),
            "sleeping": self.operations.sleeping if self.operations else 0,
            "metrics_port": self.metrics_port,
            "restarts": self.restarts,
        }

    def _serve_metrics(self, bind: str) -> None:
        port = self.settings.worker.metrics_port
        if port < 0:
            return
        from dynvllm.worker.metrics import WorkerCollector, serve_metrics

        eng = self.settings.engine
        labels = {"role": self.role_name, "model": eng.served_model_name or eng.model or ""}
        collector = WorkerCollector(self.stats_now, labels)
        self.metrics_server, self.metrics_port = serve_metrics(bind, port, collector)

    async def run(self) -> int:
        become_group_leader()
        start_group_reaper()
        rt = self.settings.runtime
        self.nc = await natsrt.connect(rt, name=f"dynvllm-worker-{self.role_name}")
        self._build_engine()
        handle = EngineHandle(generate=self.engine.generate, pool=self.engine.pool, settings=self.settings)
        role_handlers = self.role.handlers(handle)
        self.adapters = AdapterManager(self.engine, self.settings, self._republish)
        self.operations = EngineOperations(self.engine, self.settings, self._republish)
        # Each call's request id goes on the log lines written while serving it; a traced call
        # continues the caller's trace.
        self.tracing = tracing.setup(rt.otlp_traces_endpoint, f"dynvllm-worker-{self.role_name}")
        role_handlers = {name: logs.with_request_id(name, h) for name, h in role_handlers.items()}
        if self.tracing is not None:
            role_handlers = {n: tracing.traced_handler(self.tracing, n, h) for n, h in role_handlers.items()}
        handlers = {
            protocol.HEALTH: self.health,
            protocol.STATS: self.stats,
            **self.adapters.handlers(),
            **self.operations.handlers(),
            **role_handlers,
        }
        self.server = StreamServer(handlers, self.inflight, counted=set(role_handlers))
        host = natsrt.advertised_host(rt)
        bind = "127.0.0.1" if host == "127.0.0.1" else "0.0.0.0"
        port = await self.server.start(bind, self.settings.worker.rpc_port)
        self._serve_metrics(bind)
        self.instance = Instance.new(
            COMPONENT,
            role=self.role_name,
            host=host,
            port=port,
            endpoints=sorted(handlers),
            card=self._card(),
        )
        # Heartbeats from a thread of their own: the engine's streams keep this loop busy, and on a
        # starved CPU long enough for the lease to lapse while the worker serves.
        self.lease = Lease(
            self.nc,
            rt.namespace,
            self.instance,
            rt.heartbeat_interval,
            connect=lambda: natsrt.connect(rt, name=f"dynvllm-worker-{self.role_name}-lease"),
            tolerate=max(10.0, 5 * rt.lease_ttl),
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        for relay in self.relays:
            relay.start(self.instance.id)
        await self._canary()
        self.instance.card = self._card()  # with what the canary learnt (a pooling model's tasks)
        heap.freeze()  # the engine's start-up heap, before the first request comes
        await self.lease.start()
        log.warning(
            "worker %s (%s) serving %s on %s:%d",
            self.instance.id,
            self.role_name,
            self._card()["model"],
            host,
            port,
        )
        background = [asyncio.create_task(self._publish_load()), asyncio.create_task(self._watch_engine())]
        await self.stopping.wait()
        code = await self._shutdown()
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        return code

    async def _shutdown(self) -> int:
        assert self.lease is not None and self.server is not None
        await self.lease.stop()
        deadline = time.monotonic() + self.settings.worker.drain_timeout
        # A worker that had calls lately leaves only after a heartbeat interval with none: routers
        # hear the goodbye a moment late (an idle worker leaves at once).
        quiet = self.settings.runtime.heartbeat_interval
        while not self.engine_dead and time.monotonic() < deadline:
            if await self.inflight.wait_quiet(quiet, min(1.0, deadline - time.monotonic())):
                break
        await self.server.close()  # cancels what is left: each handler aborts its engine request
        for relay in self.relays:
            await relay.stop()
        await natsrt.close(self.nc)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        self.engine.shutdown()
        if self.tracing is not None:
            self.tracing.shutdown()
        return 1 if self.engine_dead else 0

    async def _republish(self) -> None:
        """Announce the card again (adapters changed): routers see it with the next heartbeat."""
        if self.instance is not None and self.lease is not None:
            self.instance.card = self._card()
            await self.lease.announce()

    async def _canary(self) -> None:
        """A one-token generation proves the engine really serves (backs /health)."""
        t0 = time.monotonic()
        try:
            await self.engine.canary()
            self.last_canary = {"ok": True, "at": time.time(), "seconds": time.monotonic() - t0}
        except Exception as exc:
            self.last_canary = {"ok": False, "at": time.time(), "error": str(exc)}

    async def _watch_engine(self) -> None:
        interval = self.settings.worker.health_check_interval
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            if self.engine.errored:
                log.error("engine died; deregistering and exiting")
                self.engine_dead = True
                self.stopping.set()
                return
            if time.monotonic() - last > interval and self.inflight.count == 0:
                await self._canary()
                last = time.monotonic()

    async def _publish_load(self) -> None:
        bus = EventBus(self.nc, self.settings.runtime.namespace)
        total = self._card().get("kv_blocks") or 0
        while True:
            s = self.snapshot
            busy = self.inflight.count > 0 or s.running > 0
            try:
                await bus.publish(
                    LOAD,
                    LoadMetrics(
                        self.instance.id if self.instance else "",
                        s.running,
                        s.waiting,
                        int(s.kv_usage * total),
                        total,
                        time.time(),
                    ),
                )
            except Exception as exc:  # NATS reconnecting: the next report goes out
                log.debug("load report not sent: %s", exc)
            await asyncio.sleep(0.1 if busy else 1.0)


def run_worker(settings: Settings, role_name: str) -> int:
    from dynvllm import registry

    role_cls = registry.load(registry.ROLES, role_name)
    logs.setup(settings.runtime.log_level, settings.runtime.log_format, f"worker {role_name}")
    with private_ipc_dir():
        if settings.worker.headless:
            from dynvllm.worker.headless import HeadlessRanks

            return int(natsrt.run(HeadlessRanks(settings, role_cls()).run()) or 0)
        worker = Worker(settings, role_name, role_cls())
        return int(natsrt.run(worker.run()) or 0)
