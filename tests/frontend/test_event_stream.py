"""The SSE response writes each batch of events as it comes, and the last with the end of the body."""

from __future__ import annotations

import asyncio

from dynvllm.frontend.event_stream import EventStream, Last


async def _never_disconnect() -> dict:
    await asyncio.Event().wait()
    return {"type": "http.disconnect"}


async def test_each_batch_is_written_before_the_next_is_asked_for():
    """The next batch is produced only once the first has been written: a stream that held a
    batch back until the next came (as an earlier version did, to find the last one) never ends
    here. On a GPU under load that hold-back delayed the first text by hundreds of ms."""
    written = asyncio.Event()
    sent: list[dict] = []

    async def events():
        yield b"data: first\n\n"
        await written.wait()
        yield b"data: second\n\n"
        yield Last(b"data: [DONE]\n\n")

    async def send(message: dict) -> None:
        sent.append(message)
        if message.get("body") == b"data: first\n\n":
            written.set()

    await asyncio.wait_for(EventStream(events())({}, _never_disconnect, send), 5)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    bodies = [(m["body"], m["more_body"]) for m in sent[1:]]
    assert bodies == [(b"data: first\n\n", True), (b"data: second\n\n", True), (b"data: [DONE]\n\n", False)]


async def test_a_stream_without_a_last_mark_still_ends_the_body():
    sent: list[dict] = []

    async def events():
        yield b"data: only\n\n"

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(EventStream(events())({}, _never_disconnect, send), 5)
    assert [(m["body"], m["more_body"]) for m in sent[1:]] == [(b"data: only\n\n", True), (b"", False)]
