"""A NATS connection whose subscription is read when its owner asks, never waking the process on
its own; it publishes without a task of its own too.

A message that arrives by itself costs its receiver a wake-up: on the 2-core VMs this project is
tested on, 50-100 us of CPU however little the client does with it (`scripts/bench_nats_wakeup.py`,
one 150-byte message every 4 ms: nats-py 82-99 us, a bare asyncio protocol 50-75 us, this
connection read every 200 ms 9 us). Frontends that share
their routing decisions receive every peer's batch, one a request of each peer: at 8 frontends
that was ~8 wake-ups, ~0.6 ms of CPU, per request routed. Yet a frontend needs its peers'
decisions only when it routes one of its own, and it is awake then anyway. So this connection's
socket is not watched by the event loop at all: `read()` takes what the kernel has buffered (a
non-blocking `recv`, nothing when empty) and is called before each routing decision and by a slow
timer that keeps the buffers short and answers the server's pings. Its `publish` writes to the
socket at once (what the kernel does not take waits for the socket to drain), where nats-py wakes
a flusher task per message; the server does not echo this connection's own messages back.

What it speaks is the NATS client protocol's subset a subscriber needs (INFO, CONNECT, SUB,
PING/PONG, MSG, HMSG, +OK, -ERR), over plain TCP with token or user/password auth. A server that
requires TLS raises `Unsupported`: the caller then subscribes through its nats-py connection.
The frame parsing (`Frames`) is pure; `Pulled` is the socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

log = logging.getLogger("dynvllm.runtime.nats_pull")
MSG, PING, PONG, ERR, INFO = 0, 1, 2, 3, 4
#: Published bytes the socket has not taken past which the server counts as gone.
OUT_LIMIT = 8 << 20
_CRLF = b"\r\n"


class Unsupported(Exception):
    """This server needs what a pulled subscription does not speak (TLS)."""


class Frames:
    """Server-to-client frames from a byte stream fed in pieces: `(MSG, subject, payload)`,
    `(PING,)`, `(PONG,)`, `(ERR, text)` and `(INFO, json text)`; +OK is consumed silently.
    Raises ValueError on a malformed message line."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple]:
        buf = self._buf
        buf += data
        out: list[tuple] = []
        i, n = 0, len(buf)
        while True:
            j = buf.find(_CRLF, i)
            if j < 0:
                break
            if buf.startswith(b"MSG ", i) or buf.startswith(b"HMSG ", i):
                # MSG subject sid [reply] size | HMSG subject sid [reply] header-size total-size
                parts = bytes(buf[i:j]).split()
                if len(parts) < 4:
                    raise ValueError(f"malformed message line: {bytes(buf[i:j])[:80]!r}")
                size, header = int(parts[-1]), int(parts[-2]) if parts[0] == b"HMSG" else 0
                end = j + 2 + size
                if end + 2 > n:
                    break  # the payload is not all here yet
                out.append((MSG, parts[1].decode(), bytes(buf[j + 2 + header : end])))
                i = end + 2
                continue
            if buf.startswith(b"PING", i):
                out.append((PING,))
            elif buf.startswith(b"PONG", i):
                out.append((PONG,))
            elif buf.startswith(b"-ERR", i):
                out.append((ERR, bytes(buf[i + 4 : j]).decode(errors="replace").strip().strip("'")))
            elif buf.startswith(b"INFO ", i):
                out.append((INFO, bytes(buf[i + 5 : j]).decode(errors="replace")))
            i = j + 2
        del buf[:i]
        return out


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    user: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> Server:
        """`tls` also for websocket URLs: neither is spoken here."""
        parts = urlsplit(url if "://" in url else "nats://" + url)
        return cls(
            parts.hostname or "127.0.0.1",
            parts.port or 4222,
            parts.username,
            parts.password,
            parts.scheme in ("tls", "ws", "wss"),
        )


class Pulled:
    """One subscription on a connection of its own; `read()` returns the messages received so far
    as (subject, payload), answering the server's pings on the way; `ping()`, called now and then,
    finds a server that vanished without closing the connection. Raises `ConnectionError` once
    the connection is lost (open another)."""

    #: Pings unanswered after which the server counts as gone (as nats-py's default).
    max_outstanding_pings = 3

    def __init__(
        self, sock: socket.socket, subject: str, frames: Frames, early: list[tuple], info: dict
    ) -> None:
        self.sock, self.subject = sock, subject
        #: The largest message the server takes (it closes the connection of one that sends more).
        self.max_payload = int(info.get("max_payload") or 1 << 20)
        #: The cluster's other servers, as the server announces them ("host:port").
        self.cluster: list[str] = list(info.get("connect_urls") or ())
        self._pings = 0
        self._loop = asyncio.get_running_loop()
        #: Bytes published that the socket has not taken yet (sent when it is writable).
        self._out = bytearray()
        #: The parser, holding any partial frame the handshake's last read left.
        self._frames = frames
        #: Messages that came with the handshake, before the server's answer to it.
        self._early = early
        #: The server's last -ERR text.
        self.error = ""
        self.closed = False

    @classmethod
    async def open(
        cls,
        urls: Sequence[str],
        subject: str,
        *,
        name: str = "dynvllm",
        token: str | None = None,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 3.0,
    ) -> Pulled:
        """Connect to the first of `urls` that answers and subscribe to `subject`."""
        errors: list[str] = []
        for url in urls:
            server = Server.parse(url.strip())
            if server.tls:
                raise Unsupported(f"{url}: TLS or websocket")
            try:
                return await asyncio.wait_for(
                    cls._open(server, subject, name, token, user, password), timeout
                )
            except (OSError, TimeoutError, ConnectionError, ValueError) as exc:
                errors.append(f"{url}: {type(exc).__name__}: {exc}")
        raise ConnectionError("; ".join(errors) or "no NATS server given")

    @classmethod
    async def _open(
        cls,
        server: Server,
        subject: str,
        name: str,
        token: str | None,
        user: str | None,
        password: str | None,
    ) -> Pulled:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            buf = b""
            while _CRLF not in buf:
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    raise ConnectionError("closed before INFO")
                buf += chunk
            line, rest = buf.split(_CRLF, 1)
            if not line.startswith(b"INFO "):
                raise ConnectionError(f"not a NATS server: {line[:60]!r}")
            info = json.loads(line[5:])
            if info.get("tls_required"):
                raise Unsupported(f"{server.host}:{server.port} requires TLS")
            connect: dict = {
                "verbose": False,
                "pedantic": False,
                "lang": "python",
                "version": "dynvllm-pull",
                "protocol": 1,
                "name": name,
                "headers": True,
                "no_responders": True,
                "echo": False,
            }
            # As nats-py: the settings' token or user (an empty password allowed), else the
            # URL's `user:password@` or `token@`.
            if token:
                connect["auth_token"] = token
            elif user:
                connect["user"], connect["pass"] = user, password or ""
            elif server.user and server.password is not None:
                connect["user"], connect["pass"] = server.user, server.password
            elif server.user:
                connect["auth_token"] = server.user
            hello = f"CONNECT {json.dumps(connect)}\r\nSUB {subject} 1\r\nPING\r\n".encode()
            await loop.sock_sendall(sock, hello)
            # The PONG to our PING says CONNECT and SUB were taken; messages may come before it.
            frames, early = Frames(), []
            data = rest
            while True:
                answered = False
                for frame in frames.feed(data):
                    if frame[0] == ERR:
                        raise ConnectionError(f"NATS refused the connection: {frame[1]}")
                    if frame[0] == MSG:
                        early.append((frame[1], frame[2]))
                    answered = answered or frame[0] == PONG
                if answered:
                    return cls(sock, subject, frames, early, info)
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    raise ConnectionError("closed during the handshake")
        except BaseException:
            sock.close()
            raise

    def read(self) -> list[tuple[str, bytes]]:
        if self.closed:
            raise ConnectionError("pulled subscription closed")
        out, self._early = self._early, []
        frames = self._frames
        while True:
            try:
                data = self.sock.recv(262144)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.close()
                raise ConnectionError(str(exc)) from exc
            if not data:
                self.close()
                raise ConnectionError(f"NATS closed the connection ({self.error or 'no reason given'})")
            try:
                got = frames.feed(data)
            except ValueError as exc:
                self.close()
                raise ConnectionError(f"NATS stream unreadable: {exc}") from exc
            for frame in got:
                if frame[0] == MSG:
                    out.append((frame[1], frame[2]))
                elif frame[0] == PING:
                    self._send(b"PONG\r\n")
                elif frame[0] == PONG:
                    self._pings = 0
                elif frame[0] == INFO:
                    self._learn(frame[1])
                elif frame[0] == ERR:
                    # Some errors end the connection (the server closes it next: the recv says
                    # so, with this text), some do not (a permissions violation): said once.
                    if frame[1] != self.error:
                        log.warning("NATS said: %s", frame[1])
                    self.error = frame[1]
        return out

    def _learn(self, text: str) -> None:
        try:
            self.cluster = list(json.loads(text).get("connect_urls") or self.cluster)
        except ValueError:
            pass

    @property
    def unanswered(self) -> int:
        """Pings sent since the last PONG read."""
        return self._pings

    def ping(self) -> None:
        """Ask for a PONG (`read()` takes it); with `max_outstanding_pings` unanswered, the
        server is gone though the connection stands (a host lost without closing it): closed."""
        if self.closed:
            raise ConnectionError("pulled connection closed")
        if self._pings >= self.max_outstanding_pings:
            self.close()
            raise ConnectionError(f"NATS answered none of {self._pings} pings")
        self._pings += 1
        self._send(b"PING\r\n")

    def publish(self, subject: str, data: bytes) -> None:
        """Raises ValueError for a message over the server's max_payload (as nats-py does: the
        server would close the connection), ConnectionError once the connection is lost."""
        if self.closed:
            raise ConnectionError("pulled connection closed")
        if len(data) > self.max_payload:
            raise ValueError(f"{len(data)} bytes: over the server's max_payload of {self.max_payload}")
        self._send(b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(data), data))

    async def flush(self, timeout: float = 1.0) -> None:
        """Wait until the socket has taken everything published."""
        deadline = self._loop.time() + timeout
        while self._out and not self.closed and self._loop.time() < deadline:
            await asyncio.sleep(0.005)

    def _send(self, data: bytes) -> None:
        if self._out:  # behind earlier bytes, in order
            self._out += data
            if len(self._out) > OUT_LIMIT:  # the server takes nothing: as good as gone
                self.close()
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return  # a lost server: the next recv says so
        if sent < len(data):
            self._out += data[sent:]
            self._loop.add_writer(self.sock, self._write_out)

    def _write_out(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(self._out)  # lost: dropped, the next recv says so
        del self._out[:sent]
        if not self._out:
            self._loop.remove_writer(self.sock)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._out:
                self._loop.remove_writer(self.sock)
                self._out.clear()
            self.sock.close()
