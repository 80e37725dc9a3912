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

    def data(self, sid: int, payload: Any) -> bytes:
        """A DATA frame; spends one credit. Callers check `can_send` first."""
        self.credits[sid] -= 1
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
        self._ids = itertools.count(1)
        self._consumed: dict[int, int] = {}
        self._unpacker = msgpack.Unpacker(raw=False)
        self._pack = msgpack.Packer().pack

    def call(self, endpoint: str, payload: Any) -> tuple[int, bytes]:
        sid = next(self._ids)
        self._consumed[sid] = 0
        return sid, self._pack([CALL, sid, endpoint, payload])

    def cancel(self, sid: int) -> bytes | None:
        """A CANCEL frame if the stream is still open (the server may still be producing)."""
        if self._consumed.pop(sid, None) is None:
            return None
        return self._pack([CANCEL, sid])

    def consumed(self, sid: int) -> bytes | None:
        """Count one item read by the consumer; a CREDIT frame once half the window is read."""
        n = self._consumed.get(sid)
        if n is None:
            return None
        n += 1
        if n >= self.window // 2:
            self._consumed[sid] = 0
            return self._pack([CREDIT, sid, n])
        self._consumed[sid] = n
        return None

    def receive(self, data: bytes) -> list[tuple[int, int, Any]]:
        """(op, sid, value) for frames of open streams: DATA payload, END None, ERROR a RemoteError.
        END and ERROR close the stream. Frames of streams already closed are dropped."""
        out: list[tuple[int, int, Any]] = []
        consumed = self._consumed
        for frame in _frames(self._unpacker, data):
            if not isinstance(frame, list) or len(frame) < 2:
                raise ProtocolError(f"malformed frame {frame!r:.80}")
            op, sid = frame[0], frame[1]
            if sid not in consumed:
                continue
            if op == DATA and len(frame) == 3:
                out.append((DATA, sid, frame[2]))
            elif op == END:
                del consumed[sid]
                out.append((END, sid, None))
            elif op == ERROR and len(frame) == 4:
                del consumed[sid]
                out.append((ERROR, sid, from_wire(str(frame[2]), str(frame[3]))))
            else:
                raise ProtocolError(f"malformed frame {frame!r:.80}")
        return out

    def close(self) -> list[int]:
        sids, self._consumed = list(self._consumed), {}
        return sids
