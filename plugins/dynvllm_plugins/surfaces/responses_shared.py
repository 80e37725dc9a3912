"""Stored responses shared by every frontend process of a namespace, through its NATS.

Each process keeps the responses it made in its own memory (`responses_store`: a hit there costs
nothing more); each is also written to a JetStream key-value bucket of the namespace before its
answer goes, so a GET, DELETE, cancel or previous_response_id that reaches another process
(--http-workers N, other frontends) finds it there. What only the process that made a response
holds, the task running a background response and its stream's events, is asked of that process
over its own subject: a cancel reaches the run, GET ?stream=true relays its events.

Bucket `responses_<namespace>` (stream `KV_responses_<namespace>`, file storage): key = the
response id, value = a record (`pack`). The stream keeps at most --responses-store-size
records, the oldest written dropped first (a background response's record is written again at
each change of state, so it counts from its last one). A record larger than what one NATS
message may carry (the server's max_payload) is written as chunks under `<id>.<n>` in the bucket
`responses_<namespace>_chunks` first, then its head; that bucket keeps as many chunks as the
other records (so at most that many times max_payload bytes), and a record whose chunks were
dropped is gone.

Subjects under the namespace:
    responses.owner.<process>   msgpack {"op": "get" | "cancel" | "delete" | "follow", "id", ...},
                                answered msgpack [status, body]; {"op": "unfollow", "to": inbox}
                                (a follower left before the end), not answered
    <inbox of a follower>       a followed stream: b"+" events, b"." the end, b"" still running
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from dynvllm.frontend.event_stream import Last
from dynvllm_plugins.surfaces.responses_store import RUNNING

log = logging.getLogger("dynvllm.frontend")

#: Response ids the shared store looks up (anything else would be a NATS wildcard or separator).
_ID = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
#: What a message may need besides a chunk (headers, subject, framing).
_OVERHEAD = 4096
#: A followed stream with nothing new says so this often; three silences end it.
KEEPALIVE = 5.0
#: How long an owner may take to answer (a cancel waits for its run to stop).
ASK_TIMEOUT = 10.0
#: How long a write or read of the bucket may take before the store counts as unreachable.
STORE_TIMEOUT = 2.0
#: How long an owner nobody listens for may still be reconnecting to NATS (which takes our
#: clients 0.25 s a try) before it counts as gone and its running responses as lost.
GONE_AFTER = 0.5
#: Buckets found gone are made again at most this often (seconds).
REMAKE_EVERY = 5.0

BACKGROUND, STREAMED = 1, 2


@dataclass
class Record:
    """What every process can read of a stored response."""

    owner: str
    status: str
    background: bool
    streamed: bool
    body: bytes
    #: The conversation a next turn continues, as JSON (None while the response runs).
    conversation: bytes | None = None
    #: The head's sequence number in the bucket's stream, as read (0: not read from it).
    revision: int = field(default=0, compare=False)

    @property
    def running(self) -> bool:
        return self.status in RUNNING


def valid_id(rid: str) -> bool:
    return _ID.match(rid) is not None


def pack(rid: str, record: Record, limit: int) -> list[tuple[str, bytes]]:
    """(key, value) pairs to write in this order: chunks of a record beyond `limit` bytes first,
    its head last (a reader that finds the head finds its chunks)."""
    flags = (BACKGROUND if record.background else 0) | (STREAMED if record.streamed else 0)
    head = [record.owner, record.status, flags]
    whole = msgpack.packb([*head, record.body, record.conversation, 0])
    if len(whole) <= limit:
        return [(rid, whole)]
    blob = msgpack.packb([record.body, record.conversation])
    size = max(1, limit - _OVERHEAD)
    chunks = [blob[i : i + size] for i in range(0, len(blob), size)]
    out = [(f"{rid}.{n}", chunk) for n, chunk in enumerate(chunks, 1)]
    return [*out, (rid, msgpack.packb([*head, None, None, len(chunks)]))]


def unpack(head: bytes, chunks: list[bytes] | None = None) -> Record:
    owner, status, flags, body, conversation, n = msgpack.unpackb(head)
    if n:
        if chunks is None or len(chunks) != n:
            raise ValueError(f"a record of {n} chunks came with {len(chunks or [])}")
        body, conversation = msgpack.unpackb(b"".join(chunks))
    return Record(owner, status, bool(flags & BACKGROUND), bool(flags & STREAMED), body, conversation)


def chunk_count(head: bytes) -> int:
    return int(msgpack.unpackb(head)[5])


class Unreachable(RuntimeError):
    """The shared store could not be asked (NATS away)."""

    @classmethod
    def of(cls, exc: BaseException) -> Unreachable:
        """`exc` as this error (itself where it is one), named by its message or its type."""
        return exc if isinstance(exc, Unreachable) else cls(str(exc) or type(exc).__name__)


class Changed(RuntimeError):
    """A record written only as it was read had been written again or deleted since."""


class SharedResponses:
    """This process's side of the shared store. Its callbacks answer what other processes ask
    of a response this process holds: `body(id)`, `cancel(id)` and `delete(id)` give (HTTP
    status, JSON body), or None where this process does not have it; `events(id, after)` gives
    its stream's events from sequence number `after` on, or None."""

    def __init__(self, nc: Any, namespace: str, size: int) -> None:
        self.nc, self.size = nc, size
        self.bucket = f"responses_{namespace}"
        self.chunks_bucket = f"{self.bucket}_chunks"
        self.subject = f"{namespace}.responses.owner.{secrets.token_hex(6)}"
        #: Largest value one message carries; larger records are chunked.
        self.limit = max(_OVERHEAD * 2, int(getattr(nc, "max_payload", 1 << 20) or (1 << 20)) - _OVERHEAD)
        self.kv: Any = None
        self.chunks: Any = None
        self._sub: Any = None
        self._remade = -REMAKE_EVERY
        #: Requests being answered and streams being relayed.
        self._relays: set[asyncio.Task] = set()
        #: Relays of streams to followers in other processes, by the follower's inbox.
        self._following: dict[str, asyncio.Task] = {}
        self.body: Callable[[str], tuple[int, bytes] | None] | None = None
        self.cancel: Callable[[str], Awaitable[tuple[int, bytes] | None]] | None = None
        self.delete: Callable[[str], Awaitable[tuple[int, bytes] | None]] | None = None
        self.events: Callable[[str, int], AsyncIterator[bytes] | None] | None = None

    async def start(self) -> None:
        """Create (or join) the buckets and listen on this process's subject. Raises where NATS
        has no JetStream."""
        await self._buckets()
        self._sub = await self.nc.subscribe(self.subject, cb=self._received)

    async def _buckets(self) -> None:
        js = self.nc.jetstream()
        self.kv = await self._bucket(js, self.bucket, "stored responses of /v1/responses")
        self.chunks = await self._bucket(js, self.chunks_bucket, "chunks of large stored responses")

    async def _remake(self) -> bool:
        """No stream answers for the buckets: the NATS server restarted without its JetStream
        state. Make them again (at most every REMAKE_EVERY s); whether they are there now.
        Without this, sharing would stay broken until every frontend restarted."""
        now = time.monotonic()
        if now - self._remade < REMAKE_EVERY:
            return False
        self._remade = now
        try:
            await self._buckets()
        except Exception as exc:
            log.debug("the shared store's buckets not made again: %s", exc)
            return False
        log.warning("the shared store of responses was gone (NATS restarted without its state): made again")
        return True

    async def _bucket(self, js: Any, bucket: str, what: str) -> Any:
        from nats.js import api
        from nats.js.errors import BadRequestError

        stream = api.StreamConfig(
            name=f"KV_{bucket}",
            description=f"dynvllm: {what}",
            subjects=[f"$KV.{bucket}.>"],
            allow_direct=True,
            allow_rollup_hdrs=True,
            deny_delete=True,
            discard=api.DiscardPolicy.OLD,
            max_msgs=self.size,
            max_msgs_per_subject=1,
            max_consumers=-1,
            storage=api.StorageType.FILE,
            num_replicas=1,
        )
        try:
            await js.add_stream(stream)
        except BadRequestError:  # there already, made by another frontend or by an operator
            have = (await js.stream_info(stream.name)).config
            if have.max_msgs != self.size:  # the frontend started last decides the size only:
                # what else an operator set on the bucket (replicas, max age ...) is kept.
                have.max_msgs = self.size
                await js.update_stream(have)
        return await js.key_value(bucket)

    async def stop(self) -> None:
        for task in list(self._relays):
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # the connection is gone already
                log.debug("responses subject not left: %s", exc)

    # ---- the bucket ------------------------------------------------------------------------
    async def put(self, rid: str, record: Record, since: int = 0) -> None:
        """Write a record, acknowledged by the server before this returns (so that a request
        that reaches another process next finds it). Raises Unreachable. `since`: write it only
        if its head is still the one read at that revision (else Changed): a process that is not
        the owner must not write back a response its owner has finished or deleted meanwhile."""
        from nats.errors import NoRespondersError

        self._connected()
        pairs = pack(rid, record, self.limit)
        # (Not for a chunked record: its chunks would be written before its head was refused.)
        expect = {"Nats-Expected-Last-Subject-Sequence": str(since)} if since and len(pairs) == 1 else None
        for key, value in pairs:
            bucket = self.bucket if key == rid else self.chunks_bucket
            headers = expect if key == rid else None
            # A plain request to the key's subject: what kv.put sends, without its ack parsing.
            # (Atomic batches, one acknowledgement for the heads of an event-loop turn, halved
            # the frontend's CPU for this but tripled the server's and halved the rate.)
            try:
                try:
                    ack = await self.nc.request(f"$KV.{bucket}.{key}", value, STORE_TIMEOUT, headers=headers)
                except NoRespondersError:
                    if not await self._remake():
                        raise
                    ack = await self.nc.request(f"$KV.{bucket}.{key}", value, STORE_TIMEOUT, headers=headers)
            except Exception as exc:
                raise Unreachable.of(exc) from exc
            if ack.data.startswith(b'{"error"'):
                if b'"err_code":10071' in ack.data:  # wrong last sequence
                    raise Changed(rid)
                raise Unreachable(ack.data.decode(errors="replace"))

    def _connected(self) -> None:
        if not self.nc.is_connected:  # reconnecting: fail now rather than after a timeout
            raise Unreachable("not connected to NATS")

    async def get(self, rid: str) -> Record | None:
        """The record of `rid`; None where no process has it (raises Unreachable)."""
        from nats.errors import NoRespondersError

        if not valid_id(rid):
            return None
        self._connected()
        try:
            try:
                entry = await self._entry(self.kv, rid)
            except NoRespondersError:
                if not await self._remake():
                    raise
                entry = await self._entry(self.kv, rid)
            if entry is None:
                return None
            head = entry.value
            n = chunk_count(head)
            chunks = [await self._value(self.chunks, f"{rid}.{k}") for k in range(1, n + 1)] if n else None
        except Exception as exc:
            raise Unreachable.of(exc) from exc
        if chunks is not None and any(c is None for c in chunks):
            return None  # its chunks were dropped before its head: gone
        record = unpack(head, chunks)  # type: ignore[arg-type]
        record.revision = int(entry.revision or 0)
        return record

    @staticmethod
    async def _entry(kv: Any, key: str) -> Any:
        from nats.js.errors import KeyNotFoundError

        try:
            return await kv.get(key)
        except KeyNotFoundError:  # KeyDeletedError is one
            return None

    @classmethod
    async def _value(cls, kv: Any, key: str) -> bytes | None:
        entry = await cls._entry(kv, key)
        return None if entry is None else entry.value

    async def purge(self, rid: str) -> None:
        """Take a record and its chunks out of the streams (raises Unreachable). Not kv.purge:
        the marker it leaves counts against the bound like a record, so deleted responses would
        push out the newest live ones."""
        self._connected()
        if not valid_id(rid):
            return
        js = self.nc.jetstream(timeout=STORE_TIMEOUT)
        try:
            await js.purge_stream(f"KV_{self.bucket}", subject=f"$KV.{self.bucket}.{rid}")
            await js.purge_stream(f"KV_{self.chunks_bucket}", subject=f"$KV.{self.chunks_bucket}.{rid}.*")
        except Exception as exc:
            raise Unreachable.of(exc) from exc

    # ---- the process that holds a response -------------------------------------------------
    async def ask(self, owner: str, op: str, rid: str, **more: Any) -> tuple[int, bytes] | None:
        """What the owning process answers (HTTP status, JSON body); None where it is gone or
        does not have the response. Unreachable where NATS or the process does not answer in time."""
        from nats.errors import NoRespondersError

        wait = STORE_TIMEOUT if op == "get" else ASK_TIMEOUT
        asked = msgpack.packb({"op": op, "id": rid, **more})
        for last in (False, True):
            self._connected()
            try:
                reply = await self.nc.request(owner, asked, timeout=wait)
                break
            except NoRespondersError:
                if last:
                    return None
            except Exception as exc:
                raise Unreachable.of(exc) from exc
            await asyncio.sleep(GONE_AFTER)
        status, body = msgpack.unpackb(reply.data)
        return None if status == 0 else (int(status), body)

    async def follow(self, owner: str, rid: str, after: int) -> AsyncIterator[bytes] | None:
        """The events of a streamed background response its owner relays; None where the owner
        is gone or no longer has them."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        try:
            if await self.ask(owner, "follow", rid, after=after, to=inbox) is None:
                await sub.unsubscribe()
                return None
        except BaseException:
            await sub.unsubscribe()
            raise
        return self._read(sub, owner, rid)

    async def _read(self, sub: Any, owner: str, rid: str) -> AsyncIterator[bytes]:
        from nats.errors import TimeoutError

        ended = False
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=3 * KEEPALIVE)
                except TimeoutError:
                    ended = True
                    yield Last(
                        b'event: error\ndata: {"type":"error","code":"server_error","message":'
                        b'"the frontend process running this response stopped answering"}\n\n'
                    )
                    return
                data = msg.data
                if data[:1] == b"+":
                    yield data[1:]
                elif data[:1] == b".":
                    ended = True
                    yield Last(data[1:])
                    return
        finally:
            if not ended:  # the client left first: its relay in the owner need not go on
                try:
                    await self.nc.publish(
                        owner, msgpack.packb({"op": "unfollow", "id": rid, "to": sub.subject})
                    )
                except Exception as exc:
                    log.debug("owner not told of a follower leaving: %s", exc)
            try:
                await sub.unsubscribe()
            except Exception as exc:
                log.debug("follower inbox not left: %s", exc)

    async def _received(self, msg: Any) -> None:
        # Each in a task of its own: a cancel waits for its run to stop, a poll need not wait.
        task = asyncio.create_task(self._asked(msg))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)

    async def _asked(self, msg: Any) -> None:
        try:
            req = msgpack.unpackb(msg.data)
            op, rid = req["op"], req["id"]
            answer: tuple[int, bytes] | None = None
            if op == "get" and self.body is not None:
                answer = self.body(rid)
            elif op == "cancel" and self.cancel is not None:
                answer = await self.cancel(rid)
            elif op == "delete" and self.delete is not None:
                answer = await self.delete(rid)
            elif op == "follow" and self.events is not None:
                events = self.events(rid, int(req.get("after", -1)))
                if events is not None:
                    to = req["to"]
                    task = asyncio.create_task(self._relay(events, to))
                    self._relays.add(task)
                    self._following[to] = task
                    task.add_done_callback(self._relays.discard)
                    task.add_done_callback(lambda _t: self._following.pop(to, None))
                    answer = (200, b"")
            elif op == "unfollow":
                if (relay := self._following.pop(req.get("to", ""), None)) is not None:
                    relay.cancel()
                return  # a plain message: no one waits for an answer
            await msg.respond(msgpack.packb(list(answer) if answer is not None else [0, b""]))
        except Exception:
            log.exception("a request about a stored response failed")

    async def _relay(self, events: AsyncIterator[bytes], to: str) -> None:
        """Publish a stream's events to a follower in another process, a keepalive while there
        are none; to the end of the run or until the follower says it left (`unfollow`)."""
        pending: asyncio.Future | None = None
        it = events.__aiter__()
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(it.__anext__())
                done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE)
                if not done:
                    await self.nc.publish(to, b"")
                    continue
                try:
                    batch = pending.result()
                except StopAsyncIteration:
                    await self.nc.publish(to, b".")
                    return
                pending = None
                size = self.limit
                for i in range(0, len(batch), size):
                    await self.nc.publish(to, b"+" + batch[i : i + size])
                if isinstance(batch, Last):
                    await self.nc.publish(to, b".")
                    return
        except Exception as exc:
            log.warning("relaying a response's events to another process stopped: %s", exc)
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
