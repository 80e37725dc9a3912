"""Stored responses of the Responses API: bodies by id in one frontend process's memory, the
conversation a next turn continues, and for background responses the task that runs them and
the events of their streams (what other processes read of them: `responses_shared`).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from dynvllm.frontend.event_stream import Last

_json = msgspec.json.Encoder().encode

#: Statuses of a background response that is still running.
RUNNING = ("queued", "in_progress")


class EventLog:
    """A background stream's events (each encoded, index = sequence number), kept so that the
    client that created it and any later reader (GET ?stream=true&starting_after=N) read them
    from any point while the run goes on."""

    def __init__(self) -> None:
        self.events: list[bytes] = []
        self.ended = False
        self._changed = asyncio.Event()

    def add(self, events: list[bytes], end: bool = False) -> None:
        self.events += events
        self.ended = self.ended or end
        self._changed.set()

    async def follow(self, after: int) -> AsyncIterator[bytes]:
        """The events after sequence number `after`, as they come; the last batch is `Last`."""
        k = max(after + 1, 0)
        while True:
            if k < len(self.events) or self.ended:
                batch, k = b"".join(self.events[k:]), len(self.events)
                if self.ended:
                    yield Last(batch)
                    return
                yield batch
                continue
            self._changed.clear()
            await self._changed.wait()


class Stored:
    """A stored response: its body, and the conversation a next turn continues (a list, or a
    function that makes it when first asked: most stored responses are never continued).

    A finished body is kept as its JSON bytes, the form GET answers with: a thousand stored
    responses as dicts are tens of thousands of objects more for every garbage collection to walk.
    """

    __slots__ = ("_body", "_conversation", "gone", "log", "task")

    def __init__(
        self, body: dict[str, Any] | bytes, conversation: list[dict[str, Any]] | Callable[[], list]
    ) -> None:
        self._body = body
        self._conversation = conversation
        #: The task running a background response (None for one answered within its request).
        self.task: asyncio.Task | None = None
        #: A streamed background response's events.
        self.log: EventLog | None = None
        #: Deleted: a run still ending must not write its record again.
        self.gone = False

    @property
    def body(self) -> dict[str, Any]:
        body = self._body
        return msgspec.json.decode(body) if isinstance(body, bytes) else body

    @body.setter
    def body(self, body: dict[str, Any] | bytes) -> None:
        self._body = body

    def encoded(self) -> bytes:
        body = self._body
        return body if isinstance(body, bytes) else _json(body)

    @property
    def conversation(self) -> list[dict[str, Any]]:
        if callable(self._conversation):
            self._conversation = self._conversation()
        return self._conversation

    @property
    def running(self) -> bool:
        body = self._body
        return not isinstance(body, bytes) and body.get("status") in RUNNING

    def drop(self) -> None:
        """Stop a background run nobody can read any more (its response deleted or evicted)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()


class ResponseStore:
    """Responses by id, least recently used dropped first beyond `size` (one process's memory);
    a background response still running when dropped is cancelled (its record then says so)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def put(self, rid: str, stored: Stored) -> None:
        self._items[rid] = stored
        self._items.move_to_end(rid)
        while len(self._items) > self.size:
            self._items.popitem(last=False)[1].drop()

    def get(self, rid: str) -> Stored | None:
        found = self._items.get(rid)
        if found is not None:
            self._items.move_to_end(rid)
        return found

    def pop(self, rid: str) -> Stored | None:
        return self._items.pop(rid, None)
