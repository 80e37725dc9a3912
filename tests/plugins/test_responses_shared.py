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
from dynvllm_plugins.surfaces.responses_stored import Kept


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


async def _kept_pair(nats_url: str) -> tuple[list, Kept, Kept]:
    """Two processes' stored responses (`Kept`, size 10) sharing one namespace."""
    import nats

    ns = "t" + secrets.token_hex(4)
    conns = [await nats.connect(nats_url) for _ in range(2)]
    owner, other = Kept(10), Kept(10)
    for kept, nc in zip((owner, other), conns, strict=True):
        await kept.attach(nc, ns)
    return conns, owner, other


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


async def test_a_deleted_record_leaves_nothing_that_counts_against_the_bound(nats_url):
    conns, a, b = await _pair(nats_url, 3)
    try:
        for r in "abc":
            await a.put(f"resp_{r}", _record(a.subject, b"{}"))
        await b.purge("resp_a")
        await b.purge("resp_b")
        await a.put("resp_d", _record(a.subject, b"{}"))
        # Two deleted, two live: the bound of 3 keeps both live ones.
        assert [await b.get(f"resp_{r}") is not None for r in "abcd"] == [False, False, True, True]
        a.limit = 10_000
        await a.put("resp_big", _record(a.subject, b"x" * 25_000))
        await a.purge("resp_big")
        js = a.nc.jetstream()
        assert (await js.stream_info(f"KV_{a.chunks_bucket}")).state.messages == 0
        assert (await js.stream_info(f"KV_{a.bucket}")).state.messages == 2
    finally:
        await _close(conns, a, b)


async def test_a_delete_passed_to_the_owner_answers_what_the_owner_answered(nats_url):

    from dynvllm.frontend.errors import RequestError
    from dynvllm_plugins.surfaces.responses_store import Stored

    conns, owner, other = await _kept_pair(nats_url)
    assert owner.shared is not None and other.shared is not None
    try:
        for rid in ("resp_a", "resp_b"):
            await owner.keep(rid, Stored(b'{"id":"%s"}' % rid.encode(), []), "completed")
        assert await other.delete("resp_a") == (200, b'{"id":"resp_a","object":"response","deleted":true}')
        for kept in (owner, other):
            with pytest.raises(RequestError) as exc:
                await kept.body("resp_a")
            assert exc.value.status == 404
        # The owner cannot take resp_b out of the shared store (its chunks' stream is gone): the
        # DELETE passed to it fails with the owner's 503, not a 200 while the record stays.
        await conns[0].jetstream().delete_stream(f"KV_{owner.shared.chunks_bucket}")
        status, body = await other.delete("resp_b")
        assert status == 503 and b"unreachable" in body
    finally:
        for kept in (owner, other):
            await kept.detach()
        js = conns[0].jetstream()
        await js.delete_stream(f"KV_{owner.shared.bucket}")
        for nc in conns:
            await nc.close()


async def test_buckets_lost_with_a_restarted_nats_server_are_made_again():
    import nats

    from dynvllm.runtime.nats import EmbeddedNats
    from tests.helpers import free_port

    port = free_port()
    server = EmbeddedNats(port=port)
    server.start()
    back = asyncio.Event()

    async def reconnected() -> None:
        back.set()

    conns = []
    try:
        opts = {"reconnect_time_wait": 0.1, "reconnected_cb": reconnected}
        conns = [await nats.connect(server.url, **opts) for _ in range(2)]
        a, b = (SharedResponses(nc, "restart", 5) for nc in conns)
        await a.start()
        await b.start()
        await a.put("resp_a", _record(a.subject, b"{}"))
        server.stop()  # and its JetStream state with it
        server = EmbeddedNats(port=port)
        server.start()
        await asyncio.wait_for(back.wait(), 10)
        while not all(nc.is_connected for nc in conns):
            await asyncio.sleep(0.05)
        # A read finds the buckets gone: made again, empty (404, not 503 for ever after).
        assert await b.get("resp_a") is None
        await a.put("resp_b", _record(a.subject, b'{"b":1}'))
        assert (await b.get("resp_b")).body == b'{"b":1}'
    finally:
        for nc in conns:
            await nc.close()
        server.stop()


async def test_a_running_response_deleted_meanwhile_is_not_written_back_as_failed(nats_url):
    """Another process reads a running response's record, then asks its owner, which has just
    deleted it: the deleted response stays deleted (not written back as failed by a GET, or as
    cancelled by a cancel)."""

    from dynvllm.frontend.errors import RequestError
    from dynvllm_plugins.surfaces.responses_store import Stored

    conns, owner, other = await _kept_pair(nats_url)
    assert owner.shared is not None and other.shared is not None
    stored = Stored({"id": "resp_run", "status": "in_progress"}, [])
    stored.task = asyncio.create_task(asyncio.sleep(60))
    ask = other.shared.ask

    async def deleted_first(owner_subject: str, op: str, rid: str, **more):  # type: ignore[no-untyped-def]
        assert (await owner.delete(rid))[0] == 200
        return await ask(owner_subject, op, rid, **more)

    try:
        await owner.keep("resp_run", stored, "in_progress")
        other.shared.ask = deleted_first  # type: ignore[method-assign]
        for kept in (other, owner, other):
            with pytest.raises(RequestError) as exc:
                await kept.body("resp_run")
            assert exc.value.status == 404
            other.shared.ask = ask  # type: ignore[method-assign]
        # The same for a cancel passed to an owner that has just deleted it.
        again = Stored({"id": "resp_run2", "status": "in_progress"}, [])
        again.task = asyncio.create_task(asyncio.sleep(60))
        await owner.keep("resp_run2", again, "in_progress")
        other.shared.ask = deleted_first  # type: ignore[method-assign]
        status, _ = await other.cancel("resp_run2")
        other.shared.ask = ask  # type: ignore[method-assign]
        assert status == 404 and await other.shared.get("resp_run2") is None
    finally:
        await _close(conns, owner.shared, other.shared)


async def test_delete_and_cancel_say_503_while_nats_is_away(nats_url):
    import nats

    nc = await nats.connect(nats_url)
    kept = Kept(10)
    await kept.attach(nc, "t" + secrets.token_hex(4))
    assert kept.shared is not None
    js = nc.jetstream()
    for bucket in (kept.shared.bucket, kept.shared.chunks_bucket):
        await js.delete_stream(f"KV_{bucket}")
    await kept.detach()
    await nc.close()
    for status, body in (await kept.delete("resp_x"), await kept.cancel("resp_x")):
        assert status == 503 and b"the shared store of responses is unreachable" in body


async def test_an_owner_reconnecting_to_nats_is_waited_for_not_counted_gone(nats_url):
    """For a moment after NATS restarts, a process that is back before the owner finds nobody on
    the owner's subject: it waits for it rather than recording its running responses failed."""
    from nats.errors import NoRespondersError

    conns, a, b = await _pair(nats_url, 10)
    a.body = lambda rid: (200, b'{"status":"in_progress"}')
    request = b.nc.request
    owner = f"{a.subject}.back"  # the owner's subject while it is reconnecting: nobody listens

    async def owner_back_after_first(*args, **kw):  # type: ignore[no-untyped-def]
        try:
            return await request(*args, **kw)
        except NoRespondersError:  # the owner resubscribes (reconnected) just after
            await a.nc.subscribe(owner, cb=a._received)
            await a.nc.flush()
            b.nc.request = request
            raise

    try:
        b.nc.request = owner_back_after_first
        assert await b.ask(owner, "get", "resp_x") == (200, b'{"status":"in_progress"}')
        assert await b.ask(f"{a.subject}x", "get", "resp_x") is None  # gone for good: after the wait
    finally:
        await _close(conns, a, b)


async def test_a_frontend_joining_a_bucket_changes_its_size_only(nats_url):
    """What an operator set on the bucket (here a max age) outlives a frontend that starts with
    another --responses-store-size; that frontend's size is the bucket's from then on."""
    conns, a, b = await _pair(nats_url, 15)
    js = a.nc.jetstream()
    have = (await js.stream_info(f"KV_{a.bucket}")).config
    have.max_age = 3600.0
    await js.update_stream(have)
    import nats

    nc = await nats.connect(nats_url)
    c = SharedResponses(nc, a.bucket.removeprefix("responses_"), 7)
    await c.start()
    now = (await js.stream_info(f"KV_{a.bucket}")).config
    assert (now.max_msgs, now.max_age) == (7, 3600.0)
    await _close([*conns, nc], a, b, c)


async def test_a_follower_that_leaves_stops_the_owners_relay(nats_url):
    """A client that stops reading a followed stream before its end: the owner stops relaying it
    (else a client re-following in a loop would leave one relay per try until the run ends)."""
    conns, a, b = await _pair(nats_url, 10)
    log = EventLog()
    log.add([b"e0"])
    a.events = lambda rid, after: log.follow(after)
    try:
        followed = await b.follow(a.subject, "resp_mine", -1)
        assert followed is not None
        it = followed.__aiter__()
        assert await asyncio.wait_for(it.__anext__(), 5) == b"e0"
        assert len(a._following) == 1
        relay = next(iter(a._following.values()))
        await it.aclose()
        for _ in range(100):
            if relay.done():
                break
            await asyncio.sleep(0.02)
        assert relay.cancelled() and not a._following
    finally:
        await _close(conns, a, b)
