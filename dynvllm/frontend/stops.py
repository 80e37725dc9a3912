"""Stop strings over streamed text: emit what is safe, hold back a possible partial match."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str], include_stop: bool = False) -> None:
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Text now safe to emit; after a match `matched` is set and the rest is dropped."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return text
        buf = self._pending + text
        best: tuple[int, str] | None = None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self.matched = s
            self._pending = ""
            return buf[: i + len(s)] if self.include_stop else buf[:i]
        keep = min(self.hold, len(buf))
        out, self._pending = buf[: len(buf) - keep], buf[len(buf) - keep :]
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out if self.matched is None else ""
