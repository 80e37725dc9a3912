"""Discovery, streaming calls and events over a real nats-server, with real processes."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynvllm.runtime import nats as natsrt
from dynvllm.runtime.discovery import Instance, Lease, Watcher
from dynvllm.runtime.errors import InstanceLost
from dynvllm.runtime.events import LOAD, EventBus, LoadMetrics
from dynvllm.runtime.names import EndpointName, InvalidName
from dynvllm.runtime.streams import StreamClientPool
from dynvllm.settings import RuntimeSettings

SCRIPT = Path(__file__).with_name("instance_proc.py")


def start_instance(url: str, namespace: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, str(SCRIPT), url, namespace], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("READY"), line
    return p, line.split()[1]


async def watcher_for(url: str, namespace: str, ttl: float = 1.0) -> tuple[object, Watcher]:
    nc = await natsrt.connect(RuntimeSettings(nats_url=url))
    w = Watcher(nc, namespace, lease_ttl=ttl)
    await w.start()
    return nc, w


def test_names_are_validated():
    assert str(EndpointName.parse("dyn.worker.generate")) == "dyn.worker.generate"
    for bad in ("a.b", "a.b c.d", "a.*.d", "a.>.d", "..x"):
        with pytest.raises(InvalidName):
            EndpointName.parse(bad)


async def test_appear_then_kill9_disappears_within_3s(nats_url):
    nc, w = await watcher_for(nats_url, "disc1")
    p, iid = start_instance(nats_url, "disc1")
    try:
        assert await w.wait_for(lambda w: w.get(iid) is not None, 3)
        inst = w.get(iid)
        assert inst.card == {"model": "m", "context_length": 128} and inst.role == "test"
        t0 = time.monotonic()
        p.send_signal(signal.SIGKILL)
        assert await w.wait_for(lambda w: w.get(iid) is None, 5)
        assert time.monotonic() - t0 < 3.0
    finally:
        p.kill()
        p.wait()
        await w.stop()
        await nc.close()


async def test_graceful_stop_deregisters_immediately(nats_url):
    nc, w = await watcher_for(nats_url, "disc2", ttl=5.0)
    removed: list[str] = []
    w.on_remove.append(lambda i: removed.append(i.id))
    p, iid = start_instance(nats_url, "disc2")
    try:
        assert await w.wait_for(lambda w: w.get(iid) is not None, 3)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        assert await w.wait_for(lambda w: w.get(iid) is None, 3)
        assert time.monotonic() - t0 < 1.0  # far below the 5 s lease: the bye message did it
        assert removed == [iid]
    finally:
        p.kill()
        p.wait()
        await w.stop()
        await nc.close()


async def test_instance_killed_mid_stream_gives_typed_error(nats_url):
    nc, w = await watcher_for(nats_url, "disc3")
    p, iid = start_instance(nats_url, "disc3")
    pool = StreamClientPool()
    w.on_remove.append(lambda i: pool.drop(i.id))
    try:
        assert await w.wait_for(lambda w: w.get(iid) is not None, 3)
        inst = w.get(iid)
        conn = await pool.get(inst.id, inst.host, inst.port)
        stream = conn.call("ticks", None)
        assert await stream.__anext__() == 1
        p.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(InstanceLost):
            async with asyncio.timeout(3):
                async for _ in stream:
                    pass
        assert time.monotonic() - t0 < 3
    finally:
        p.kill()
        p.wait()
        await pool.close()
        await w.stop()
        await nc.close()


async def test_nats_restart_clients_reconnect_and_reregister(tmp_path):
    from tests.helpers import free_port

    port = free_port()
    server = natsrt.EmbeddedNats(port=port, store_dir=str(tmp_path / "js"))
    url = server.start()
    nc, w = await watcher_for(url, "disc4", ttl=1.0)
    p, iid = start_instance(url, "disc4")
    try:
        assert await w.wait_for(lambda w: w.get(iid) is not None, 3)
        server.stop()
        await asyncio.sleep(1.5)  # longer than the lease, but the watcher is blind, not told
        assert w.get(iid) is not None  # its streams still work: keep routing to it
        server = natsrt.EmbeddedNats(port=port, store_dir=str(tmp_path / "js"))
        server.start()
        # Neither process restarted: both reconnect on their own and heartbeats re-register.
        assert await w.wait_for(lambda w: w.get(iid) is not None, 10)
        assert p.poll() is None
        inst = w.get(iid)
        pool = StreamClientPool()
        conn = await pool.get(inst.id, inst.host, inst.port)
        stream = conn.call("ticks", None)
        assert [await stream.__anext__() for _ in range(3)] == [1, 2, 3]
        await stream.aclose()
        await pool.close()
        p.kill()  # a real death, heard through a working NATS: the lease expires
        assert await w.wait_for(lambda w: w.get(iid) is None, 5)
    finally:
        p.kill()
        p.wait()
        await w.stop()
        await nc.close()
        server.stop()


async def test_malformed_discovery_messages_are_ignored(nats_url):
    nc, w = await watcher_for(nats_url, "disc5")
    try:
        await nc.publish("disc5.instances.hb", b"\xc1garbage")
        await nc.publish("disc5.instances.hb", b"\x93\x01\x02\x03")
        lease = Lease(nc, "disc5", Instance.new("worker", role="x", card={"model": "ok"}), 0.2)
        await lease.start()
        assert await w.wait_for(lambda w: len(w.instances()) == 1, 3)
        assert w.instances()[0].card == {"model": "ok"}
        await lease.stop()
    finally:
        await w.stop()
        await nc.close()


async def test_typed_events(nats_url):
    nc = await natsrt.connect(RuntimeSettings(nats_url=nats_url))
    got: list[LoadMetrics] = []
    bus = EventBus(nc, "ev1")
    await bus.subscribe(LOAD, got.append)
    await nc.publish(LOAD.subject("ev1"), b"not msgpack")  # dropped, subscriber survives
    await bus.publish(LOAD, LoadMetrics("w1", running=3, waiting=1, kv_used_blocks=10, kv_total_blocks=64))
    await nc.flush()
    for _ in range(50):
        if got:
            break
        await asyncio.sleep(0.02)
    assert got == [LoadMetrics("w1", 3, 1, 10, 64, 0.0)]
    await nc.close()


async def test_a_lease_beats_from_its_own_thread_while_the_loop_is_busy(nats_url):
    """A worker's loop busy for seconds keeps its lease (heartbeats from a thread); one that stays
    stuck past `tolerate` loses it."""
    import threading

    rt = RuntimeSettings(nats_url=nats_url)
    seen: list[float] = []
    ready, done = threading.Event(), threading.Event()

    def listen() -> None:  # an observer with its own loop, as a frontend in another process
        async def run() -> None:
            nc = await natsrt.connect(rt)

            async def on_beat(msg) -> None:
                seen.append(time.monotonic())

            await nc.subscribe("disc9.instances.hb", cb=on_beat)
            ready.set()
            while not done.is_set():
                await asyncio.sleep(0.02)
            await nc.close()

        asyncio.run(run())

    observer = threading.Thread(target=listen)
    observer.start()
    assert ready.wait(10)
    nc = await natsrt.connect(rt)
    inst = Instance.new("worker", role="test")
    lease = Lease(nc, "disc9", inst, 0.1, connect=lambda: natsrt.connect(rt), tolerate=0.8)
    try:
        await lease.start()
        await asyncio.sleep(0.4)
        t0 = time.monotonic()
        time.sleep(1.6)  # this loop stands still: none of its own tasks runs
        assert len([x for x in seen if t0 + 0.1 < x < t0 + 0.7]) >= 3  # the thread beat on
        assert not [x for x in seen if t0 + 1.05 < x < t0 + 1.6]  # until the loop was stuck too long
        await asyncio.sleep(0.4)
        assert seen[-1] > t0 + 1.6  # the loop runs again: so do the beats
    finally:
        await lease.stop()
        done.set()
        observer.join()
        await natsrt.close(nc)
    assert lease._thread is None


async def test_a_watcher_whose_loop_stood_still_does_not_expire_what_it_could_not_hear(nats_url):
    rt = RuntimeSettings(nats_url=nats_url)
    nc, w = await watcher_for(nats_url, "disc10", ttl=1.0)
    removed: list[str] = []
    w.on_remove.append(lambda inst: removed.append(inst.id))
    lease_nc = await natsrt.connect(rt)
    inst = Instance.new("worker", role="test")
    # Heartbeats from a thread: they keep coming while this loop (the watcher's) stands still.
    lease = Lease(lease_nc, "disc10", inst, 0.1, connect=lambda: natsrt.connect(rt))
    try:
        await lease.start()
        assert await w.wait_for(lambda w: w.get(inst.id) is not None, 3)
        time.sleep(2.0)  # twice the lease: nothing read here meanwhile
        await asyncio.sleep(0.6)
        assert removed == [] and w.get(inst.id) is not None
    finally:
        await lease.stop()
        await w.stop()
        await natsrt.close(lease_nc)
        await natsrt.close(nc)
