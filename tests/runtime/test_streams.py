"""Streaming calls between real sockets: deltas, cancel, errors, back-pressure, lost instances."""

from __future__ import annotations

import asyncio
import time

import pytest

from dynvllm.runtime.errors import BadRequest, InstanceLost, RemoteError, UnknownEndpoint
from dynvllm.runtime.streams import WINDOW, Connection, Inflight, StreamClientPool, StreamServer, unary


class Probe:
    def __init__(self) -> None:
        self.cancelled_at: float | None = None
        self.produced = 0

    async def count(self, payload):
        for i in range(payload["n"]):
            yield {"i": i}

    async def forever(self, payload):
        try:
            while True:
                self.produced += 1
                yield self.produced
                await asyncio.sleep(0.001)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled_at = time.monotonic()
            raise

    async def fast(self, payload):
        while True:
            self.produced += 1
            yield self.produced

    async def paced(self, payload):
        """An item every 20 ms for payload["for"] seconds, then silence (a stalled host)."""
        end = time.monotonic() + payload["for"]
        while time.monotonic() < end:
            yield 1
            await asyncio.sleep(0.02)
        await asyncio.sleep(3600)

    async def boom(self, payload):
        yield 1
        raise BadRequest("prompt is too long: 9000 > 2048")

    async def crash(self, payload):
        raise RuntimeError("kaput")
        yield  # pragma: no cover

    async def echo(self, payload):
        return {"echo": payload}


@pytest.fixture
async def served():
    probe = Probe()
    server = StreamServer(
        {
            "count": probe.count,
            "forever": probe.forever,
            "fast": probe.fast,
            "paced": probe.paced,
            "boom": probe.boom,
            "crash": probe.crash,
            "echo": probe.echo,
        }
    )
    port = await server.start()
    conn = Connection("127.0.0.1", port, "test")
    await conn.open()
    yield probe, server, conn, port
    await conn.close()
    await server.close()


async def test_stream_and_unary(served):
    _probe, _server, conn, _ = served
    items = [x async for x in conn.call("count", {"n": 200})]
    assert items == [{"i": i} for i in range(200)]
    assert await unary(conn, "echo", [1, "a"]) == {"echo": [1, "a"]}


async def test_cancel_reaches_handler_quickly(served):
    probe, _, conn, _ = served
    stream = conn.call("forever", None)
    async for _ in stream:
        if probe.produced > 5:
            break
    t0 = time.monotonic()
    await stream.aclose()
    for _ in range(100):
        if probe.cancelled_at:
            break
        await asyncio.sleep(0.005)
    assert probe.cancelled_at is not None
    assert probe.cancelled_at - t0 < 0.1


async def test_handler_errors_are_typed(served):
    _, _, conn, _ = served
    got = []
    with pytest.raises(BadRequest, match="prompt is too long"):
        async for x in conn.call("boom", None):
            got.append(x)
    assert got == [1]
    with pytest.raises(RemoteError, match="kaput") as info:
        async for _ in conn.call("crash", None):
            pass
    assert info.value.kind == "RuntimeError"
    with pytest.raises(UnknownEndpoint, match="no endpoint 'nope'"):
        await unary(conn, "nope", None)


async def test_slow_consumer_applies_back_pressure(served):
    probe, _, conn, _ = served
    stream = conn.call("fast", None)
    await stream.__anext__()
    await asyncio.sleep(0.3)
    # The handler may run at most one window ahead of what the client consumed.
    assert probe.produced <= WINDOW + 2
    await stream.aclose()


async def test_malformed_bytes_close_only_that_connection(served):
    _, _, conn, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\xc1\xc1 definitely not msgpack")
    assert await asyncio.wait_for(reader.read(10), 2) == b""  # the server hung up on the bad peer
    writer.close()
    assert [x async for x in conn.call("count", {"n": 3})] == [{"i": 0}, {"i": 1}, {"i": 2}]


async def test_server_gone_mid_stream_is_instance_lost(served):
    _probe, server, conn, _ = served
    stream = conn.call("forever", None)
    await stream.__anext__()
    t0 = time.monotonic()
    await server.close()
    with pytest.raises(InstanceLost):
        async for _ in stream:
            pass
    assert time.monotonic() - t0 < 3


async def test_an_expired_lease_drops_a_connection_only_once_it_is_quiet(served):
    """Missing heartbeats while a stream still flows (a host stalled for a moment) fail nothing;
    the connection goes once it has been as quiet as the lease, or stays if the host is back."""
    _, _, _, port = served
    pool = StreamClientPool()
    conn = await pool.get("w", "127.0.0.1", port)
    assert await pool.get("w", "127.0.0.1", port) is conn
    await pool.drop_when_silent("w", 0.3, back=lambda _: True)  # heartbeating again: kept
    assert not conn.closed
    stream = conn.call("paced", {"for": 1.0})
    got: list[int] = []
    lost: list[InstanceLost] = []

    async def read() -> None:
        try:
            async for x in stream:
                got.append(x)
        except InstanceLost as exc:
            lost.append(exc)

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    await pool.drop_when_silent("w", 0.3, back=lambda _: False)
    waited = time.monotonic() - t0
    await reader
    assert 1.0 <= waited < 2.0, waited  # the 0.9 s of stream left, then 0.3 s of quiet
    assert len(got) >= 30 and conn.closed
    assert lost and "nothing heard" in lost[0].message


async def test_a_drain_waits_for_quiet_after_the_last_call_not_only_for_idle():
    """A call routed just before a worker's goodbye reached the routers still comes: draining
    waits until no call came in for `quiet` seconds, and an idle server is quiet at once."""
    calls = Inflight()
    t0 = time.monotonic()
    assert await calls.wait_quiet(0.3, 1.0)  # never called: quiet at once
    assert time.monotonic() - t0 < 0.1
    calls.enter()
    assert not await calls.wait_quiet(0.3, 0.2)  # in flight: not even idle
    calls.leave()
    calls.enter()
    calls.leave()
    t0 = time.monotonic()
    assert await calls.wait_quiet(0.3, 1.0)  # idle, but the call came in just now
    assert 0.25 < time.monotonic() - t0 < 0.6
    calls.enter()
    calls.leave()
    assert not await calls.wait_quiet(0.3, 0.1)  # the timeout comes before the quiet
