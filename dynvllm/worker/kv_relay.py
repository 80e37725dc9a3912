"""Relays the engine's KV events (ZMQ) to routers (NATS), keyed as the router needs them
(`block_keys`), repairing sequence gaps by replay.

vLLM publishes on a loopback PUB socket and keeps recent batches for a ROUTER replay socket.
A missed sequence number is asked for again; what the replay cannot return is a gap the
routers see in our own relay sequence, and they then drop and rebuild this worker's state.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from dynvllm.ports import reserve_ports
from dynvllm.router.block_keys import BlockKeys
from dynvllm.router.kv_events import decode_batch
from dynvllm.runtime.events import EventBus
from dynvllm.runtime.kv_topic import KV_EVENTS, KvEventBatch

log = logging.getLogger("dynvllm.worker.kv")
END_SEQ = -1


def offset_port(endpoint: str, rank: int) -> str:
    """tcp://host:P -> tcp://host:P+rank, as vLLM offsets a data-parallel rank's KV endpoints."""
    host, port = endpoint.rsplit(":", 1)
    return f"{host}:{int(port) + rank}"


def bind_relays(bus: EventBus, ranks: range) -> tuple[str, str, list[KvEventRelay]]:
    """Loopback KV-event and replay endpoints for an engine, and one bound relay per data-parallel
    rank (vLLM publishes rank r on the endpoints' ports + r). Relays start once the instance id
    they speak for is known."""
    pub, pub_held = reserve_ports(ranks.stop)
    replay, replay_held = reserve_ports(ranks.stop)
    endpoint, replay_endpoint = f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{replay}"
    for unused in [*pub_held[: ranks.start], *replay_held[: ranks.start]]:
        unused.close()  # ranks another host runs
    relays = []
    for rank in ranks:
        relay = KvEventRelay(bus, "", offset_port(endpoint, rank), offset_port(replay_endpoint, rank))
        relay.held = [pub_held[rank], replay_held[rank]]  # until the relay stops
        relay.bind()
        relays.append(relay)
    return endpoint, replay_endpoint, relays


class KvEventRelay:
    def __init__(
        self,
        bus: EventBus,
        instance_id: str,
        endpoint: str,
        replay_endpoint: str | None,
        topic: str = "kv",
    ) -> None:
        self.bus, self.instance_id = bus, instance_id
        self.endpoint, self.replay_endpoint, self.topic = endpoint, replay_endpoint, topic
        # vLLM numbers batches from 0: anything before the first one we see is replayed too.
        self.last_engine_seq: int = -1
        self.relay_seq = 0
        self.replayed = 0
        #: Engine messages that were not (topic, seq, payload) and were dropped.
        self.malformed = 0
        self.keys = BlockKeys()
        self._task: asyncio.Task | None = None
        #: Sockets holding this relay's ports for the engine (see `reserve_ports`).
        self.held: list = []

    def bind(self) -> None:
        """Bind the loopback SUB socket before the engine starts: vLLM's PUB connects to a
        host-specific endpoint (it binds only wildcard ones), so nothing it sends is missed."""
        import zmq
        import zmq.asyncio

        self._ctx = zmq.asyncio.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.RCVHWM, 100_000)
        self._sub.bind(self.endpoint)
        self._sub.setsockopt(zmq.SUBSCRIBE, self.topic.encode())

    def start(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for s in self.held:
            s.close()

    async def _publish(self, payload: bytes) -> None:
        dp, events = decode_batch(payload)
        keyed = [list(e) for e in map(self.keys.translate, events) if e is not None]
        if not keyed:
            return
        self.relay_seq += 1
        await self.bus.publish(KV_EVENTS, KvEventBatch(self.instance_id, dp, self.relay_seq, keyed))

    async def _replay(self, ctx: Any, start: int) -> None:
        import zmq

        if not self.replay_endpoint:
            return
        sock = ctx.socket(zmq.DEALER)
        sock.connect(self.replay_endpoint)
        try:
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                if not await sock.poll(2000):
                    return
                frames = await sock.recv_multipart()
                seq = int.from_bytes(frames[-2], "big", signed=True)
                if seq == END_SEQ:
                    return
                if seq > self.last_engine_seq:
                    await self._publish(frames[-1])
                    self.last_engine_seq = seq
                    self.replayed += 1
        finally:
            sock.close(linger=0)

    async def handle(self, ctx: Any, frames: list[bytes]) -> None:
        seq = int.from_bytes(frames[1], "big", signed=True)
        if seq > self.last_engine_seq + 1:
            await self._replay(ctx, self.last_engine_seq + 1)
        if seq <= self.last_engine_seq:
            return  # already relayed through a replay
        await self._publish(frames[2])
        self.last_engine_seq = seq

    async def _run(self) -> None:
        ctx, sub = self._ctx, self._sub
        try:
            while True:
                frames = await sub.recv_multipart()
                if len(frames) != 3:
                    self.malformed += 1
                    if self.malformed == 1:
                        log.warning(
                            "dropping KV event messages of %d frames from %s", len(frames), self.endpoint
                        )
                    continue
                try:
                    await self.handle(ctx, frames)
                except Exception:
                    log.exception("dropping a KV event batch that could not be relayed")
        finally:
            sub.close(linger=0)
            ctx.term()
