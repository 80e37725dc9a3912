"""The shared store of stored responses on a real nats-server: records written by one process
read by another, chunked beyond a message's size, bounded in number, purged with their chunks,
and an owner answering cancel, delete and a follower of its events."""

from __future__ import annotations

import asyncio
import secrets

import msgpack
import pytest

from dynvllm.frontend.event_stream import Last
from dynvllm_plugins.surfaces.responses_shared import Record, SharedResponses, Unreachable, pack, unpack
from dynvllm_plugins.surfaces.responses_store import EventLog


def _record(owner: str, body: bytes, conversation: bytes | None = b"[]", status: str = "completed") -> Record:
    return Record(owner, status, False, False, body, conversation)


def test_a_record_beyond_the_limit_is_written_as_chunks_before_its_head():
    small = _record("o", b'{"id":"resp_a"}')
    assert [k for k, _ in pack("resp_a", small, 1 << 20)] == ["resp_a"]
    assert unpack(pack("resp_a", small, 1 << 20)[0][1]) == small
    big = _record("o", b"x" * 50_000, b'[{"role":"user","content":"' + b"y" * 30_000 + b'"}]')
    pairs = pack("resp_b", big, 10_000)
    keys = [k for k, _ in pairs]
    assert keys[-1] == "resp_b" and keys[:-1] == [f"resp_b.{n}" for n in range(1, len(keys))]
    blob = len(msgpack.packb([big.body, big.conversation]))
    assert len(keys) - 1 == -(-blob // (10_000 - 4096)) == 14
    assert all(len(v) <= 10_000 for _, v in pairs)
    assert unpack(pairs[-1][1], [v for _, v in pairs[:-1]]) == big
    with pytest.raises(ValueError):
        unpack(pairs[-1][1], [v for _, v in pairs[:-2]])


async def _pair(nats_url: str, size: int) -> tuple[list, SharedResponses, SharedResponses]:
    import nats

    ns = "t" + secrets.token_hex(4)
    conns = [await nats.connect(nats_url) for _ in range(2)]
    a, b = (SharedResponses(nc, ns, size) for nc in conns)
    await a.start()
    await b.start()
    return conns, a, b


async def _close(conns: list, *stores: SharedResponses) -> None:
    for s in stores:
        await s.stop()
    js = stores[0].nc.jetstream()
    for bucket in (stores[0].bucket, stores[0].chunks_bucket):
        await js.delete_stream(f"KV_{bucket}")
    for nc in conns:
        await nc.close()


async def test_records_written_by_one_process_are_read_by_another(nats_url):
    conns, a, b = await _pair(nats_url, 15)
    try:
        a.limit = 10_000  # a large record in chunks, through the real server
        big = _record(a.subject, b"x" * 45_000, b"[" + b'"turn",' * 3000 + b'"end"]')
        await a.put("resp_big", big)
        assert await b.get("resp_big") == big
        assert await b.get("resp_none") is None and await b.get("bad.id*") is None
        await b.purge("resp_big")  # the head and every chunk
        assert await a.get("resp_big") is None
        assert [await a._value(a.chunks, f"resp_big.{n}") for n in range(1, 15)] == [None] * 14
        # At most `size` records in the namespace: the oldest written go first.
        for n in range(17):
            await (a if n % 2 else b).put(f"resp_{n}", _record(a.subject, b'{"n":%d}' % n))
        assert [await b.get(f"resp_{n}") is not None for n in range(17)] == [False] * 2 + [True] * 15
        # Written again (a background response's next state), a record counts from then on.
        await a.put("resp_2", _record(a.subject, b'{"n":2}', status="cancelled"))
        await a.put("resp_17", _record(a.subject, b'{"n":17}'))
        assert (await b.get("resp_2")).status == "cancelled" and await b.get("resp_3") is None
    finally:
        await _close(conns, a, b)
    # Without its connection a process says so at once, rather than after a timeout.
    with pytest.raises(Unreachable):
        await a.put("resp_1", _record(a.subject, b"{}"))
    with pytest.raises(Unreachable):
        await b.get("resp_2")


async def test_the_owner_answers_cancel_delete_and_followers(nats_url):
    conns, a, b = await _pair(nats_url, 10)
    log = EventLog()
    log.add([b"e0", b"e1"])
    asked = []

    async def cancel(rid):
        asked.append(("cancel", rid))
        return (200, b'{"status":"cancelled"}') if rid == "resp_mine" else None

    async def delete(rid):
        asked.append(("delete", rid))
        return None

    a.cancel, a.delete = cancel, delete
    a.events = lambda rid, after: log.follow(after) if rid == "resp_mine" else None
    try:
        assert await b.ask(a.subject, "cancel", "resp_mine") == (200, b'{"status":"cancelled"}')
        assert await b.ask(a.subject, "delete", "resp_other") is None
        assert await b.ask(f"{a.subject}x", "cancel", "resp_mine") is None  # nobody there
        assert asked == [("cancel", "resp_mine"), ("delete", "resp_other")]
        assert await b.follow(a.subject, "resp_other", -1) is None
        followed = await b.follow(a.subject, "resp_mine", 0)
        assert followed is not None
        got: list[bytes] = []

        async def read() -> None:
            async for batch in followed:
                got.append(batch)

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.2)
        a.limit = 16_384
        log.add([b"e2" * 40_000])  # beyond one message at this limit: relayed in pieces
        await asyncio.sleep(0.2)
        log.add([b"e3"], end=True)
        await asyncio.wait_for(reader, 10)
        assert b"".join(got) == b"e1" + b"e2" * 40_000 + b"e3" and isinstance(got[-1], Last)
    finally:
        await _close(conns, a, b)


async def test_a_nats_server_without_jetstream_leaves_responses_in_each_process(caplog, tmp_path):
    import subprocess

    import nats

    from dynvllm.runtime.nats import nats_server_binary
    from dynvllm_plugins.surfaces.responses_stored import Kept
    from tests.helpers import free_port

    port = free_port()
    server = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)], stderr=subprocess.PIPE, text=True
    )
    try:
        assert server.stderr is not None
        while "Listening for client connections" not in server.stderr.readline():
            pass
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        kept = Kept(10)
        await kept.attach(nc, "nojs")
        assert kept.shared is None
        assert "stay in each frontend process" in caplog.text
        assert kept.missing("resp_x", "response_id").message.endswith(
            "in the memory of the frontend process that created them)"
        )
        await nc.close()
    finally:
        server.terminate()
        server.wait(10)
