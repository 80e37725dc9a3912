"""One-hop streaming calls over a direct TCP socket that each instance advertises in discovery.

The protocol (frames, credits, cancellation) is `dynvllm.runtime.wire`; this module only moves
bytes and runs handlers. A dropped connection fails every open stream with InstanceLost at once;
a lease that expires while the connection still looks open does the same through
`StreamClientPool.drop`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any

from dynvllm.runtime.errors import InstanceLost, RemoteError, UnknownEndpoint, kind_of
from dynvllm.runtime.wire import CALL, CANCEL, DATA, END, ERROR, WINDOW, ClientWire, ProtocolError, ServerWire

log = logging.getLogger(__name__)

_HIGH_WATER = 1 << 20

# A stream is an async generator: the server closes it (`aclose`) when the caller goes away.
Handler = Callable[[Any], AsyncGenerator[Any, None] | Awaitable[Any]]


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Inflight:
    """Calls being served, counted in one place for every handler (drain and health read it)."""

    def __init__(self) -> None:
        self.count = 0
        #: When the last call came in (monotonic): a drain waits for quiet, not only for idle.
        self.last = float("-inf")
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self.last = time.monotonic()
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True once nothing is in flight; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def wait_quiet(self, quiet: float, timeout: float) -> bool:
        """True once nothing is in flight and no call came in for `quiet` seconds; False if
        `timeout` passed first. A draining server's goodbye reaches its callers a moment after it
        is sent: a call routed just before still comes, and must find the server serving."""
        end = time.monotonic() + timeout
        while await self.wait_idle(max(0.0, end - time.monotonic())):
            wait = quiet - (time.monotonic() - self.last)
            if wait <= 0:
                return True
            if time.monotonic() + wait > end:
                return False
            await asyncio.sleep(wait)
        return False


class StreamServer:
    """Serves named endpoints; a handler is an async generator (stream) or coroutine (unary).

    Every call passes through one wrapper here: in-flight accounting, cancellation when the
    caller cancels or goes away, and typed errors back to the caller (unexpected ones logged
    with their traceback).
    """

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        inflight: Inflight | None = None,
        counted: set[str] | None = None,
    ) -> None:
        self.handlers = dict(handlers)
        self.inflight = inflight or Inflight()
        #: Endpoints whose calls count as in flight (None: all); probes such as health do not.
        self.counted = counted
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
        me = asyncio.current_task()
        assert me is not None
        self._conns.add(me)
        try:
            await _ServerConnection(self, writer).run(reader)
        finally:
            self._conns.discard(me)


class _TurnWriter:
    """Frames written in one event-loop turn leave in one write: one syscall per turn, not one
    per frame (an engine step yields a delta for every running request; a frontend turn handles
    calls, credits and cancels of many requests, and a loopback send costs as much as routing
    one)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def add(self, frame: bytes) -> None:
        if not self.pending:
            self._loop.call_soon(self.flush)
        self.pending.append(frame)

    def flush(self) -> None:
        if self.pending and not self.writer.is_closing():
            self.writer.write(b"".join(self.pending))
        self.pending.clear()


class _ServerConnection:
    """One client connection: reads frames, runs a task per call, writes coalesced replies."""

    def __init__(self, server: StreamServer, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.writer = writer
        self.wire = ServerWire()
        self.tasks: dict[int, asyncio.Task] = {}
        self.wakeups: dict[int, asyncio.Event] = {}
        self.out = _TurnWriter(writer)
        self._buffered = writer.transport.get_write_buffer_size
        _nodelay(writer)

    async def _send(self, frame: bytes) -> None:
        self.out.add(frame)
        if self._buffered() > _HIGH_WATER:
            await self.writer.drain()

    async def _send_data(self, sid: int, item: Any) -> None:
        wire = self.wire
        frame = wire.data(sid, item)
        while frame is None:  # out of credit: wait until the client reads (or cancels)
            if not wire.is_open(sid):
                raise asyncio.CancelledError
            wake = self.wakeups.setdefault(sid, asyncio.Event())
            wake.clear()
            await wake.wait()
            frame = wire.data(sid, item)
        await self._send(frame)

    async def _call(self, sid: int, endpoint: str, payload: Any) -> None:
        counted = self.server.counted
        inflight = self.server.inflight if counted is None or endpoint in counted else None
        if inflight is not None:
            inflight.enter()
        try:
            handler = self.server.handlers.get(endpoint)
            if handler is None:
                known = sorted(self.server.handlers)
                raise UnknownEndpoint(f"no endpoint {endpoint!r}; this instance serves {known}")
            result = handler(payload)
            if inspect.isawaitable(result):
                await self._send_data(sid, await result)
            else:
                try:
                    async for item in result:
                        await self._send_data(sid, item)
                finally:
                    await result.aclose()
            await self._send(self.wire.end(sid))
        except asyncio.CancelledError:
            pass  # the caller cancelled or went away; the handler's own cleanup has run
        except Exception as exc:
            if not isinstance(exc, RemoteError):
                log.exception("handler %s failed", endpoint)
            if self.wire.is_open(sid):
                await self._send(self.wire.error(sid, kind_of(exc), str(exc)))
        finally:
            if inflight is not None:
                inflight.leave()
            self.tasks.pop(sid, None)
            self.wakeups.pop(sid, None)

    def _cancel(self, sid: int) -> None:
        task = self.tasks.pop(sid, None)
        if task is not None:
            task.cancel()

    async def run(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                for event in self.wire.receive(data):
                    op, sid = event[0], event[1]
                    if op == CALL:
                        self.tasks[sid] = asyncio.create_task(self._call(sid, event[2], event[3]))
                    elif op == CANCEL:
                        self._cancel(sid)
                    else:  # CREDIT
                        wake = self.wakeups.get(sid)
                        if wake is not None:
                            wake.set()
        except ProtocolError as exc:
            log.warning("closing a connection after a malformed frame: %s", exc)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client went away or the server is closing: the streams end below
        finally:
            for sid in self.wire.close():
                self._cancel(sid)
            for task in list(self.tasks.values()):
                task.cancel()
            self.out.flush()
            self.writer.close()


class ResponseStream:
    """Async iterator over one call's responses; leaving it early cancels the remote handler."""

    def __init__(self, conn: Connection, sid: int) -> None:
        self._conn = conn
        self._sid = sid
        self._queue: asyncio.Queue = asyncio.Queue()
        self._consumed = 0
        self._half = conn.wire.half_window
        self.done = False
        self.taken = 0  # items read so far

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> Any:
        if self.done:
            raise StopAsyncIteration
        op, value = await self._queue.get()
        self.taken += 1
        if op == DATA:
            self._consumed += 1
            if self._consumed >= self._half:
                self._conn._write(self._conn.wire.credit(self._sid, self._consumed))
                self._consumed = 0
            return value
        self.done = True
        if op == END:
            raise StopAsyncIteration
        raise value

    async def aclose(self) -> None:
        """Cancel the call if it is still running."""
        if not self.done:
            self.done = True
            self._conn._streams.pop(self._sid, None)
            self._conn._write(self._conn.wire.cancel(self._sid))

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _push(self, op: int, value: Any) -> None:
        self._queue.put_nowait((op, value))

    def queued(self) -> int:
        """Items already here, not yet read."""
        return self._queue.qsize()


class Connection:
    """A multiplexed client connection to one instance."""

    def __init__(self, host: str, port: int, instance_id: str = "") -> None:
        self.host, self.port, self.instance_id = host, port, instance_id
        self.wire = ClientWire()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._streams: dict[int, ResponseStream] = {}
        self._out: _TurnWriter | None = None
        self.closed = False
        #: When bytes last came from the instance (monotonic): a sign of life beside heartbeats.
        self.heard = time.monotonic()

    async def open(self, timeout: float = 3.0) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=1 << 20), timeout
            )
        except (OSError, TimeoutError) as exc:
            self.closed = True
            where = f"{self.host}:{self.port}"
            raise InstanceLost(f"cannot reach instance {self.instance_id} at {where}: {exc}") from exc
        self._writer = writer
        _nodelay(writer)
        self._out = _TurnWriter(writer)
        self._reader_task = asyncio.create_task(self._read(reader))

    def _write(self, frame: bytes | None) -> None:
        if frame is not None and self._out is not None and not self.closed:
            self._out.add(frame)

    def call(self, endpoint: str, payload: Any) -> ResponseStream:
        if self.closed:
            raise InstanceLost(f"instance {self.instance_id} at {self.host}:{self.port} is gone")
        sid, frame = self.wire.call(endpoint, payload)
        stream = ResponseStream(self, sid)
        self._streams[sid] = stream
        self._write(frame)
        return stream

    async def _read(self, reader: asyncio.StreamReader) -> None:
        reason = "connection closed"
        streams = self._streams
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                self.heard = time.monotonic()
                for frame in self.wire.receive(data):
                    if frame[0] == DATA:
                        stream = streams.get(frame[1])
                        if stream is not None:
                            stream._queue.put_nowait((DATA, frame[2]))
                    else:
                        stream = streams.pop(frame[1], None)
                        if stream is not None:
                            stream._push(frame[0], frame[2] if len(frame) > 2 else None)
        except ProtocolError as exc:
            reason = f"the instance sent a malformed frame: {exc}"
            log.warning("instance %s: %s", self.instance_id, reason)
        except (ConnectionError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
        except asyncio.CancelledError:
            reason = "connection dropped"
        finally:
            self.fail(reason)

    def fail(self, reason: str) -> None:
        """Fail every open stream with InstanceLost and close the socket."""
        self.closed = True
        self.wire.close()
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
            fut.exception()  # retrieved here, so a failure no one else awaited is not reported twice
            raise
        finally:
            self._opening.pop(instance_id, None)

    def drop(self, instance_id: str, reason: str = "lease expired") -> None:
        conn = self._conns.pop(instance_id, None)
        if conn is not None:
            conn.fail(reason)

    async def drop_when_silent(self, instance_id: str, quiet: float, back: Callable[[str], bool]) -> None:
        """Drop the connection to an instance whose lease expired once nothing has come from it
        for `quiet` seconds, unless it is `back` (heartbeating again) first.

        Missing heartbeats alone are weak evidence: a host that stalled for a moment (two cores
        shared by an engine's busy loop and a starting process) misses a 2-second lease while
        its streams still flow, and failing them then would migrate or lose healthy requests.
        A host cut off sends nothing at all, and is dropped once its connection has been quiet
        for `quiet` seconds after the expiry.

        Silence counts only from when the expiry was noticed: the quiet that came before it also
        covers a stall of the instance's process, or of the whole host, that has just ended, and
        judging on it dropped a live worker's streams 50 ms after it missed its lease (a stream on
        an adapter no other worker holds then has nowhere to go)."""
        noticed = time.monotonic()
        await asyncio.sleep(0.05)  # data that arrived while this loop was busy is read first
        while not back(instance_id):
            conn = self._conns.get(instance_id)
            if conn is None or conn.closed:
                return
            now = time.monotonic()
            silent = now - max(conn.heard, noticed)
            if silent >= quiet:
                self.drop(instance_id, f"lease expired and nothing heard for {now - conn.heard:.1f}s")
                return
            await asyncio.sleep(quiet - silent)

    async def close(self) -> None:
        for conn in list(self._conns.values()):
            await conn.close()
        self._conns.clear()


async def unary(conn: Connection, endpoint: str, payload: Any, timeout: float = 30.0) -> Any:
    """Call an endpoint that answers once (admin operations, stage hops)."""
    stream = conn.call(endpoint, payload)
    try:
        async with asyncio.timeout(timeout):
            result = None
            async for item in stream:
                result = item
            return result
    finally:
        await stream.aclose()


__all__ = ["WINDOW", "Connection", "Inflight", "ResponseStream", "StreamClientPool", "StreamServer", "unary"]
