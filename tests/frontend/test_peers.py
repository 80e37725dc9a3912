"""Frontends as peers over a real nats-server: a late one loads the index, decisions fan out."""

from __future__ import annotations

import asyncio
import contextlib
import time

from dynvllm.frontend.peers import RouterPeers
from dynvllm.frontend.routing import Router
from dynvllm.router import hashing
from dynvllm.runtime import nats as natsrt
from dynvllm.runtime.events import EventBus
from dynvllm.runtime.kv_topic import KV_EVENTS, KvEventBatch
from dynvllm.settings import RouterSettings, RuntimeSettings
from tests.helpers import NatsServer, free_port

NS = "peers"


async def _until(check, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _two_frontends(rt: RuntimeSettings, **b_options):
    """Two KV routers with their RouterPeers (not started), each on a NATS connection of its own;
    stopped and closed on the way out. `b_options` go to the second's RouterPeers."""
    nc_a, nc_b = [await natsrt.connect(rt) for _ in range(2)]
    a, b = Router(RouterSettings(router="kv")), Router(RouterSettings(router="kv"))
    peers_a, peers_b = RouterPeers(nc_a, rt, a), RouterPeers(nc_b, rt, b, **b_options)
    try:
        yield a, b, peers_a, peers_b
    finally:
        await peers_a.stop()
        await peers_b.stop()
        for nc in (nc_a, nc_b):
            await nc.close()


def test_a_late_frontend_loads_the_index_and_peers_share_their_load(nats_url):
    async def main() -> None:
        rt = RuntimeSettings(nats_url=nats_url, namespace=NS, heartbeat_interval=0.1, lease_ttl=1.0)
        worker_nc, nc_a, nc_b = [await natsrt.connect(rt) for _ in range(3)]
        a, b = Router(RouterSettings(router="kv")), Router(RouterSettings(router="kv"))
        peers_a, peers_b = RouterPeers(nc_a, rt, a), RouterPeers(nc_b, rt, b)
        try:
            await peers_a.start(share=True)
            assert peers_a.bootstrap is None  # nobody to ask: cold, and at once
            prompt = list(range(320))
            keys = hashing.chain(prompt, 32)
            bus = EventBus(worker_nc, NS)
            await bus.publish(KV_EVENTS, KvEventBatch("w1", 0, 1, [["stored", keys]]))
            await _until(lambda: a.index.overlaps(keys) == {("w1", 0): 10})

            t0 = time.monotonic()
            await peers_b.start(share=True)
            assert peers_b.bootstrap is not None and peers_b.bootstrap[0] == 10
            assert time.monotonic() - t0 < 1.0
            assert b.index is not None and b.index.overlaps(keys) == {("w1", 0): 10}
            # The next event continues b's relay sequence: no gap, as if it had seen them all.
            await bus.publish(KV_EVENTS, KvEventBatch("w1", 0, 2, [["removed", keys[5:]]]))
            await _until(lambda: b.index.overlaps(keys) == {("w1", 0): 5})
            assert b.policy.gaps == 0  # type: ignore[attr-defined]

            # A request routed by a reaches b's load; its end and a's goodbye take it out again.
            pick = a.choose(["w1", "w2"], prompt, 32)
            ticket = a.started(pick.worker, 10.0, pick.rank, pick.keys)
            await _until(lambda: b.inflight.get(pick.worker, 0) == 1)
            assert b.load.active_blocks[pick.worker] == 10
            a.finished(pick.worker, 10.0, pick.rank, pick.keys, 0, ticket)
            await _until(lambda: b.inflight.get(pick.worker, 0) == 0)
            a.started(pick.worker, 10.0, pick.rank, pick.keys)
            await _until(lambda: b.inflight.get(pick.worker, 0) == 1)
            await peers_a.stop()
            await _until(lambda: b.inflight.get(pick.worker, 0) == 0)
            assert b.peers is not None and len(b.peers) == 0
        finally:
            await peers_b.stop()
            for nc in (worker_nc, nc_a, nc_b):
                await nc.close()

    asyncio.run(main())


def test_peer_decisions_are_taken_in_when_a_frontend_routes_not_when_they_arrive(nats_url):
    """The peers' batches wait in the socket (no wake-up each) until this frontend routes."""

    async def main() -> None:
        rt = RuntimeSettings(nats_url=nats_url, namespace=NS + "pull", heartbeat_interval=0.1, lease_ttl=5.0)
        # b's timer never comes in this test: only its routing reads the peers' batches.
        async with _two_frontends(rt, pull_interval=3600) as (a, b, peers_a, peers_b):
            await peers_a.start(share=True)
            await peers_b.start(share=True)
            assert peers_b._pulled is not None and b.pull is not None
            await _until(lambda: a.peers is not None and len(a.peers) == 1)  # b's hello, read by a's timer
            await asyncio.sleep(0.3)
            assert b.peers is not None and len(b.peers) == 0  # a's hello waits in b's socket
            peers = b.peers
            await _until(lambda: b.choose(["w1", "w2"], list(range(1000, 1064)), 32) and len(peers) == 1)

            prompt = list(range(320))
            pick = a.choose(["w1", "w2"], prompt, 32)
            a.started(pick.worker, 10.0, pick.rank, pick.keys)
            await asyncio.sleep(0.3)  # published, delivered, and not applied
            assert b.inflight.get(pick.worker, 0) == 0
            await _until(
                lambda: (
                    b.choose(["w1", "w2"], list(range(2000, 2064)), 32) and b.inflight.get(pick.worker) == 1
                )
            )
            assert b.load.active_blocks[pick.worker] == 10

    asyncio.run(main())


def test_peers_share_again_after_a_nats_restart(tmp_path):
    """The on-demand connection is lost with the server and made again by its timer; a record
    published meanwhile is lost, and sent again: by its frontend once reconnected, and to a peer
    that shows it a gap in its sequence."""
    port = free_port()
    server = natsrt.EmbeddedNats(port=port, store_dir=str(tmp_path / "js"))
    server.start()

    async def main() -> None:
        nonlocal server
        rt = RuntimeSettings(nats_url=server.url, namespace=NS + "re", heartbeat_interval=0.1, lease_ttl=5.0)
        async with _two_frontends(rt) as (a, b, peers_a, peers_b):
            await peers_a.start(share=True)
            await peers_b.start(share=True)
            await _until(lambda: a.peers is not None and len(a.peers) == 1 and len(b.peers or ()) == 1)
            first = peers_b._pulled
            server.stop()
            assert first is not None
            await _until(lambda: first.closed, timeout=5)
            pick = a.choose(["w1", "w2"], list(range(320)), 32)
            a.started(pick.worker, 10.0, pick.rank, pick.keys)  # its record is lost: no server
            server = natsrt.EmbeddedNats(port=port, store_dir=str(tmp_path / "js"))
            server.start()
            # The heartbeat's list of open requests brings it in once both are connected again.
            await _until(lambda: b.inflight.get(pick.worker, 0) == 1, timeout=10)
            assert peers_b._pulled is not first and not peers_b._pulled.closed  # type: ignore[union-attr]

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_many_requests_announced_at_once_go_in_parts_under_the_servers_max_payload(tmp_path):
    """A frontend with many requests in flight greets a newcomer with all of them: more than
    the server takes in one message, which would cost the connection (and again at each retry)."""
    server = NatsServer(tmp_path, config="max_payload: 4096\n")

    async def main() -> None:
        rt = RuntimeSettings(nats_url=server.url, namespace=NS + "big", heartbeat_interval=0.1, lease_ttl=5.0)
        async with _two_frontends(rt) as (a, b, peers_a, peers_b):
            await peers_a.start(share=True)
            for i in range(100):  # alone: nothing published per request yet
                pick = a.choose(["w1", "w2"], list(range(1000 * i, 1000 * i + 320)), 32)
                a.started(pick.worker, 10.0, pick.rank, pick.keys)
            first = peers_a._pulled
            await peers_b.start(share=True)
            await _until(lambda: sum(b.inflight.values()) == 100, timeout=5)
            assert dict(b.inflight) == dict(a.inflight)
            assert peers_a._pulled is first and first is not None and not first.closed

    try:
        asyncio.run(main())
    finally:
        server.stop()
