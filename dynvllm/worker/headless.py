"""`--headless`: this host's data-parallel ranks of an engine whose leader runs elsewhere.

vLLM runs an engine's ranks on several hosts: the leader (a normal worker started with
`--data-parallel-size N --data-parallel-size-local L --data-parallel-address A
--data-parallel-rpc-port P`) owns the request path; other hosts start engine cores only
(`--headless --data-parallel-start-rank R`), which connect to the leader. This process starts
those cores, relays their KV events in the leader's name (so routers see every rank of the
leader), and registers as an `engine` instance so `dynvllm status` shows it. It serves no
requests itself.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from typing import Any

from dynvllm.runtime import nats as natsrt
from dynvllm.runtime.discovery import Instance, Lease, Watcher
from dynvllm.runtime.events import EventBus
from dynvllm.settings import Settings
from dynvllm.worker.kv_relay import KvEventRelay, bind_relays

log = logging.getLogger("dynvllm.worker")
COMPONENT = "engine"


def leader_of(instances: list[Instance], address: str, rpc_port: int) -> Instance | None:
    """The worker that leads the data-parallel engine at (address, rpc_port)."""
    for inst in instances:
        card = inst.card
        if (
            inst.component == "worker"
            and card.get("dp_address") == address
            and card.get("dp_rpc_port") == rpc_port
        ):
            return inst
    return None


class HeadlessRanks:
    def __init__(self, settings: Settings, role: Any) -> None:
        self.settings, self.role = settings, role
        self.manager: Any = None
        self.relays: list[KvEventRelay] = []
        self.stopping = asyncio.Event()

    def _start_engines(self, kv_endpoint: str | None, kv_replay: str | None) -> Any:
        from vllm.utils.network_utils import get_tcp_uri
        from vllm.v1.engine.utils import CoreEngineProcManager
        from vllm.v1.executor import Executor

        from dynvllm.models.hub import resolve_model
        from dynvllm.worker.engine_args import engine_start_args, vllm_config

        eng = self.settings.engine
        assert eng.model
        model = resolve_model(eng.model, eng.revision)
        overrides = self.role.engine_overrides(self.settings)
        args = engine_start_args(self.settings, model, overrides, kv_endpoint, kv_replay)
        cfg = vllm_config(args, headless=True)
        pc = cfg.parallel_config
        self.first_rank, self.count = pc.data_parallel_rank, pc.data_parallel_size_local
        self.address, self.rpc_port = pc.data_parallel_master_ip, pc.data_parallel_rpc_port
        return CoreEngineProcManager(
            local_engine_count=pc.data_parallel_size_local,
            start_index=pc.data_parallel_rank,
            local_start_index=0,
            vllm_config=cfg,
            local_client=False,
            handshake_address=get_tcp_uri(pc.data_parallel_master_ip, pc.data_parallel_rpc_port),
            executor_class=Executor.get_class(cfg),
            log_stats=not args.disable_log_stats,
        )

    async def run(self) -> int:
        from dynvllm.process import become_group_leader, start_group_reaper
        from dynvllm.worker.vllm_engine import VllmEngine

        become_group_leader()
        start_group_reaper()
        rt = self.settings.runtime
        nc = await natsrt.connect(rt, name="dynvllm-headless")
        endpoint = replay = None
        if self.settings.publishes_kv_events():
            ranks = VllmEngine().local_ranks(self.settings)
            endpoint, replay, self.relays = bind_relays(EventBus(nc, rt.namespace), ranks)
        self.manager = self._start_engines(endpoint, replay)
        died = threading.Event()

        def monitor() -> None:
            try:
                self.manager.monitor_engine_liveness()
            except Exception as exc:
                log.error("headless engine ranks failed: %s", exc)
            died.set()

        threading.Thread(target=monitor, daemon=True).start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        watcher = Watcher(nc, rt.namespace, rt.lease_ttl)
        await watcher.start()
        leader = None
        while leader is None and not self.stopping.is_set() and not died.is_set():
            leader = leader_of(watcher.instances(), self.address, self.rpc_port)
            await asyncio.sleep(0.2)
        await watcher.stop()
        lease = None
        if leader is not None:
            for relay in self.relays:
                relay.start(leader.id)  # events of our ranks, in the leader's name
            card = {
                "model": self.settings.engine.served_model_name or self.settings.engine.model,
                "leader": leader.id,
                "dp_size": self.count,
                "dp_start_rank": self.first_rank,
            }
            instance = Instance.new(COMPONENT, role=f"{self.role.stage}-headless", card=card)
            lease = Lease(nc, rt.namespace, instance, rt.heartbeat_interval)
            await lease.start()
            log.warning(
                "ranks %d..%d serving for leader %s",
                self.first_rank,
                self.first_rank + self.count - 1,
                leader.id,
            )
        while not self.stopping.is_set() and not died.is_set():
            await asyncio.sleep(0.2)
        if lease is not None:
            await lease.stop()
        for relay in self.relays:
            await relay.stop()
        await natsrt.close(nc)
        self.manager.shutdown(timeout=self.settings.worker.drain_timeout)
        return 1 if died.is_set() and not self.stopping.is_set() else 0
