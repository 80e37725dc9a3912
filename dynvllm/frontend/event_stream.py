"""A server-sent-events response that costs one socket write per batch of events.

Starlette's StreamingResponse writes every chunk and then an empty closing chunk, and watches for
the client leaving through an anyio task group. Per request that is a write more and several
tasks more than needed; at hundreds of requests a second those writes are what the frontend's
core spends most on. Here the last events leave with the end of the body in one write, and one
plain task watches for a disconnect, cancelling the stream (and so the worker's request) when the
client goes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

Scope = dict[str, Any]


class EventStream:
    media_type = b"text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: Mapping[str, str] | None = None) -> None:
        self.events = events
        self.raw_headers = [
            (b"content-type", self.media_type),
            (b"cache-control", b"no-cache"),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()),
        ]

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        task = asyncio.current_task()
        assert task is not None
        ended = False
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            if not ended:  # the server reports a disconnect after the body ends, too
                gone = True
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            held: bytes | None = None
            async for chunk in self.events:
                if held is not None:
                    await send({"type": "http.response.body", "body": held, "more_body": True})
                held = chunk
            ended = True
            await send({"type": "http.response.body", "body": held or b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # our own cancellation: the client left, and nothing is left to send
        finally:
            watcher.cancel()
