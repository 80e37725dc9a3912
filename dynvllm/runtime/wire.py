"""The stream-call protocol without I/O: bytes in, frames out; credits and cancellation as state.

Frames are msgpack arrays on one persistent, multiplexed connection:
    client -> server  [CALL, sid, endpoint, payload] [CANCEL, sid] [CREDIT, sid, n]
    server -> client  [DATA, sid, payload] [END, sid] [ERROR, sid, kind, message]
Each stream starts with WINDOW credits: the server sends a DATA frame only while it holds one,
and the client returns credits as its consumer reads, so a slow reader stalls only its stream.
Nothing here touches a socket or an event loop; `dynvllm.runtime.streams` moves the bytes.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgpack

from dynvllm.runtime.errors import from_wire

CALL, CANCEL, CREDIT, DATA, END, ERROR = range(6)
WINDOW = 64


class ProtocolError(ValueError):
    """The peer sent bytes that are not a frame of this protocol; the connection must close."""


def _frames(unpacker: msgpack.Unpacker, data: bytes) -> list:
    unpacker.feed(data)
    try:
        return list(unpacker)
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as exc:
        raise ProtocolError(f"undecodable bytes: {exc}") from None


class ServerWire:
    """Server side of one connection: which streams are open and how many frames each may send."""

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self.credits: dict[int, int] = {}
        self._unpacker = msgpack.Unpacker(raw=False)
        self._pack = msgpack.Packer().pack

    def receive(self, data: bytes) -> list[list]:
        """Events for the bytes received: [CALL, sid, endpoint, payload], [CANCEL, sid] for an
        open stream (now closed), [CREDIT, sid] when a stream may send again."""
        events: list[list] = []
        for frame in _frames(self._unpacker, data):
            if not isinstance(frame, list) or len(frame) < 2 or not isinstance(frame[1], int):
                raise ProtocolError(f"malformed frame {frame!r:.80}")
            op, sid = frame[0], frame[1]
            if op == CALL and len(frame) == 4 and isinstance(frame[2], str):
                if sid in self.credits:
                    raise ProtocolError(f"stream {sid} is already open")
                self.credits[sid] = self.window
                events.append(frame)
            elif op == CANCEL and len(frame) == 2:
                if self.credits.pop(sid, None) is not None:
                    events.append(frame)
            elif op == CREDIT and len(frame) == 3 and isinstance(frame[2], int) and frame[2] > 0:
                if sid in self.credits:
                    self.credits[sid] += frame[2]
                    events.append([CREDIT, sid])
            else:
                raise ProtocolError(f"malformed frame {frame!r:.80}")
        return events

    def is_open(self, sid: int) -> bool:
        return sid in self.credits

    def can_send(self, sid: int) -> bool:
        return self.credits.get(sid, 0) > 0

    def data(self, sid: int, payload: Any) -> bytes | None:
        """A DATA frame, spending one credit; None while the stream has no credit left."""
        credits = self.credits
        n = credits.get(sid, 0)
        if n <= 0:
            return None
        credits[sid] = n - 1
        return self._pack([DATA, sid, payload])

    def end(self, sid: int) -> bytes:
        self.credits.pop(sid, None)
        return self._pack([END, sid])

    def error(self, sid: int, kind: str, message: str) -> bytes:
        self.credits.pop(sid, None)
        return self._pack([ERROR, sid, kind, message])

    def close(self) -> list[int]:
        """Streams still open when the connection ends (their handlers must be cancelled)."""
        sids, self.credits = list(self.credits), {}
        return sids


class ClientWire:
    """Client side of one connection: stream ids, credits to return, frames routed to streams."""

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self.half_window = max(1, window // 2)
        self._ids = itertools.count(1)
        self._open: set[int] = set()
        self._unpacker = msgpack.Unpacker(raw=False)
        self._pack = msgpack.Packer().pack

    def call(self, endpoint: str, payload: Any) -> tuple[int, bytes]:
        sid = next(self._ids)
        self._open.add(sid)
        return sid, self._pack([CALL, sid, endpoint, payload])

    def cancel(self, sid: int) -> bytes | None:
        """A CANCEL frame if the stream is still open (the server may still be producing)."""
        if sid not in self._open:
            return None
        self._open.discard(sid)
        return self._pack([CANCEL, sid])

    def credit(self, sid: int, n: int) -> bytes | None:
        """A CREDIT frame for `n` items the consumer has read, if the stream is still open.
        Consumers return credits every `half_window` items: the server never runs dry while
        the consumer keeps up, and never holds more than `window` unread frames."""
        if sid not in self._open:
            return None
        return self._pack([CREDIT, sid, n])

    def receive(self, data: bytes) -> list[list]:
        """Frames of open streams: [DATA, sid, payload], [END, sid], [ERROR, sid, RemoteError].
        END and ERROR close the stream; frames of streams already closed are dropped."""
        out: list[list] = []
        live = self._open
        unpacker = self._unpacker
        unpacker.feed(data)
        try:
            for frame in unpacker:
                op, sid = frame[0], frame[1]
                if sid not in live:
                    continue
                if op == DATA and len(frame) == 3:
                    out.append(frame)
                elif op == END:
                    live.discard(sid)
                    out.append(frame)
                elif op == ERROR and len(frame) == 4:
                    live.discard(sid)
                    out.append([ERROR, sid, from_wire(str(frame[2]), str(frame[3]))])
                else:
                    raise ProtocolError(f"malformed frame {frame!r:.80}")
        except (
            ValueError,
            TypeError,
            KeyError,
            IndexError,
            msgpack.UnpackException,
            msgpack.ExtraData,
        ) as exc:
            if isinstance(exc, ProtocolError):
                raise
            raise ProtocolError(f"undecodable bytes or frame: {exc}") from None
        return out

    def close(self) -> list[int]:
        sids, self._open = list(self._open), set()
        return sids
