"""One-hop streaming calls over a direct TCP socket that each instance advertises in discovery.

Frames are msgpack arrays on a persistent, multiplexed connection:
    client -> server  [CALL, sid, endpoint, payload] [CANCEL, sid] [CREDIT, sid, n]
    server -> client  [DATA, sid, payload] [END, sid] [ERROR, sid, kind, message]
Per-stream credits bound buffering: a slow consumer stalls only its own handler. A dropped
connection fails every open stream with InstanceLost at once; a lease that expires while the
connection still looks open does the same through `StreamClientPool.drop`.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgpack

from dynvllm.runtime.errors import BadRequest, InstanceLost, RemoteError, UnknownEndpoint, from_wire, kind_of

log = logging.getLogger(__name__)

CALL, CANCEL, CREDIT, DATA, END, ERROR = range(6)
WINDOW = 64
_HIGH_WATER = 1 << 20

Handler = Callable[[Any], AsyncIterator[Any] | Awaitable[Any]]


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Credit:
    __slots__ = ("event", "n")

    def __init__(self, n: int) -> None:
        self.n = n
        self.event = asyncio.Event()

    def add(self, n: int) -> None:
        self.n += n
        self.event.set()

    async def take(self) -> None:
        while self.n <= 0:
            self.event.clear()
            await self.event.wait()
        self.n -= 1


class StreamServer:
    """Serves named endpoints; a handler is an async generator (stream) or coroutine (unary)."""

    def __init__(self, handlers: dict[str, Handler]) -> None:
        self.handlers = dict(handlers)
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve_conn, host, port, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        me = asyncio.current_task()
        assert me is not None
        self._conns.add(me)
        streams: dict[int, tuple[asyncio.Task, _Credit]] = {}
        unpacker = msgpack.Unpacker(raw=False)
        pack = msgpack.Packer().pack
        # Frames produced in one event-loop turn (an engine step yields a delta for every
        # running request) leave in one write: one syscall per turn, not one per delta.
        pending: list[bytes] = []
        loop = asyncio.get_running_loop()

        def flush() -> None:
            if pending and not writer.is_closing():
                writer.write(b"".join(pending))
            pending.clear()

        async def send(frame: list) -> None:
            if not pending:
                loop.call_soon(flush)
            pending.append(pack(frame))
            if writer.transport.get_write_buffer_size() > _HIGH_WATER:
                await writer.drain()

        async def run(sid: int, endpoint: str, payload: Any, credit: _Credit) -> None:
            try:
                handler = self.handlers.get(endpoint)
                if handler is None:
                    raise UnknownEndpoint(
                        f"no endpoint {endpoint!r}; this instance serves {sorted(self.handlers)}"
                    )
                result = handler(payload)
                if inspect.isasyncgen(result):
                    try:
                        async for item in result:
                            await credit.take()
                            await send([DATA, sid, item])
                    finally:
                        await result.aclose()
                else:
                    await send([DATA, sid, await result])
                await send([END, sid])
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # every handler failure reaches the caller, typed
                if not isinstance(exc, RemoteError):
                    log.exception("handler %s failed", endpoint)
                try:
                    await send([ERROR, sid, kind_of(exc), str(exc)])
                except Exception:
                    pass
            finally:
                streams.pop(sid, None)

        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                unpacker.feed(data)
                for frame in unpacker:
                    if not isinstance(frame, list) or len(frame) < 2 or not isinstance(frame[1], int):
                        raise ValueError(f"malformed frame {frame!r:.80}")
                    op, sid = frame[0], frame[1]
                    if op == CALL and len(frame) == 4:
                        credit = _Credit(WINDOW)
                        task = asyncio.create_task(run(sid, frame[2], frame[3], credit))
                        streams[sid] = (task, credit)
                    elif op == CANCEL:
                        entry = streams.pop(sid, None)
                        if entry:
                            entry[0].cancel()
                    elif op == CREDIT and len(frame) == 3:
                        entry = streams.get(sid)
                        if entry:
                            entry[1].add(int(frame[2]))
                    else:
                        raise ValueError(f"malformed frame {frame!r:.80}")
        except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as exc:
            log.warning("closing connection after a malformed frame: %s", exc)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            for task, _ in list(streams.values()):
                task.cancel()
            flush()
            writer.close()
            self._conns.discard(me)


class ResponseStream:
    """Async iterator over one call's responses; leaving it early cancels the remote handler."""

    def __init__(self, conn: Connection, sid: int) -> None:
        self._conn = conn
        self._sid = sid
        self._queue: asyncio.Queue = asyncio.Queue()
        self._consumed = 0
        self.done = False

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> Any:
        if self.done:
            raise StopAsyncIteration
        op, value = await self._queue.get()
        if op == DATA:
            self._consumed += 1
            if self._consumed >= WINDOW // 2:
                self._conn._send([CREDIT, self._sid, self._consumed])
                self._consumed = 0
            return value
        self.done = True
        self._conn._streams.pop(self._sid, None)
        if op == END:
            raise StopAsyncIteration
        raise value

    async def aclose(self) -> None:
        """Cancel the call if it is still running."""
        if not self.done:
            self.done = True
            self._conn._streams.pop(self._sid, None)
            self._conn._send([CANCEL, self._sid])

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _push(self, op: int, value: Any) -> None:
        self._queue.put_nowait((op, value))


class Connection:
    """A multiplexed client connection to one instance."""

    def __init__(self, host: str, port: int, instance_id: str = "") -> None:
        self.host, self.port, self.instance_id = host, port, instance_id
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._streams: dict[int, ResponseStream] = {}
        self._ids = itertools.count(1)
        self._pack = msgpack.Packer().pack
        self.closed = False

    async def open(self, timeout: float = 3.0) -> None:
        try:
            reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=1 << 20), timeout
            )
        except (TimeoutError, OSError) as exc:
            self.closed = True
            raise InstanceLost(
                f"cannot reach instance {self.instance_id} at {self.host}:{self.port}: {exc}"
            ) from exc
        _nodelay(self._writer)
        self._reader_task = asyncio.create_task(self._read(reader))

    def _send(self, frame: list) -> None:
        if self._writer is not None and not self.closed:
            self._writer.write(self._pack(frame))

    def call(self, endpoint: str, payload: Any) -> ResponseStream:
        if self.closed:
            raise InstanceLost(f"instance {self.instance_id} at {self.host}:{self.port} is gone")
        sid = next(self._ids)
        stream = ResponseStream(self, sid)
        self._streams[sid] = stream
        self._send([CALL, sid, endpoint, payload])
        return stream

    async def _read(self, reader: asyncio.StreamReader) -> None:
        unpacker = msgpack.Unpacker(raw=False)
        reason = "connection closed"
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                unpacker.feed(data)
                for frame in unpacker:
                    stream = self._streams.get(frame[1])
                    if stream is None:
                        continue
                    op = frame[0]
                    if op == DATA:
                        stream._push(DATA, frame[2])
                    elif op == END:
                        stream._push(END, None)
                    elif op == ERROR:
                        stream._push(ERROR, from_wire(frame[2], frame[3]))
        except (ConnectionError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
        except asyncio.CancelledError:
            reason = "connection dropped"
        finally:
            self.fail(reason)

    def fail(self, reason: str) -> None:
        """Fail every open stream with InstanceLost and close the socket."""
        self.closed = True
        for stream in list(self._streams.values()):
            stream._push(ERROR, InstanceLost(f"instance {self.instance_id} lost: {reason}"))
        self._streams.clear()
        if self._writer is not None:
            self._writer.close()

    async def close(self) -> None:
        self.fail("closed by client")
        if self._reader_task:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)


class StreamClientPool:
    """One connection per instance, opened on first use."""

    def __init__(self) -> None:
        self._conns: dict[str, Connection] = {}
        self._opening: dict[str, asyncio.Future] = {}

    async def get(self, instance_id: str, host: str, port: int) -> Connection:
        conn = self._conns.get(instance_id)
        if conn is not None and not conn.closed:
            return conn
        pending = self._opening.get(instance_id)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._opening[instance_id] = fut
        try:
            conn = Connection(host, port, instance_id)
            await conn.open()
            self._conns[instance_id] = conn
            fut.set_result(conn)
            return conn
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        finally:
            self._opening.pop(instance_id, None)

    def drop(self, instance_id: str, reason: str = "lease expired") -> None:
        conn = self._conns.pop(instance_id, None)
        if conn is not None:
            conn.fail(reason)

    async def close(self) -> None:
        for conn in list(self._conns.values()):
            await conn.close()
        self._conns.clear()


async def unary(conn: Connection, endpoint: str, payload: Any, timeout: float = 30.0) -> Any:
    """Call an endpoint that answers once (admin operations)."""
    stream = conn.call(endpoint, payload)
    try:
        async with asyncio.timeout(timeout):
            result = None
            async for item in stream:
                result = item
            return result
    finally:
        await stream.aclose()


__all__ = ["BadRequest", "Connection", "ResponseStream", "StreamClientPool", "StreamServer", "unary"]
