"""The SSE response writes each batch of events as it comes, and the last with the end of the body;
its status line waits for the first events; a client that leaves ends the stream."""

from __future__ import annotations

import asyncio

import pytest

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


async def test_the_status_line_carries_the_routing_headers_set_by_the_first_events():
    where: dict[str, str] = {}
    sent: list[dict] = []

    async def events():
        where["X-Dynvllm-Worker"] = "w1"  # known once the request has been routed
        yield Last(b"data: [DONE]\n\n")

    async def send(message: dict) -> None:
        sent.append(message)

    await asyncio.wait_for(EventStream(events(), headers=lambda: where)({}, _never_disconnect, send), 5)
    assert sent[0]["headers"] == [
        (b"content-type", b"text/event-stream"),
        (b"cache-control", b"no-cache"),
        (b"x-dynvllm-worker", b"w1"),
    ]
    assert [(m["body"], m["more_body"]) for m in sent[1:]] == [(b"data: [DONE]\n\n", False)]


async def test_a_failure_before_the_first_event_is_a_json_error_with_its_status():
    sent: list[dict] = []

    async def events():
        raise LookupError("no live worker")
        yield b""  # an async generator

    async def send(message: dict) -> None:
        sent.append(message)

    def early_error(exc: Exception) -> tuple[int, bytes] | None:
        return (503, b'{"error": "' + str(exc).encode() + b'"}') if isinstance(exc, LookupError) else None

    await asyncio.wait_for(EventStream(events(), early_error=early_error)({}, _never_disconnect, send), 5)
    assert sent == [
        {"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]},
        {"type": "http.response.body", "body": b'{"error": "no live worker"}', "more_body": False},
    ]

    async def other():
        raise ValueError("not an early error")
        yield b""

    with pytest.raises(ValueError):  # what early_error does not answer propagates
        await EventStream(other(), early_error=early_error)({}, _never_disconnect, send)


async def test_a_client_that_leaves_cancels_the_stream_quietly():
    closed = asyncio.Event()
    sent: list[dict] = []
    left = asyncio.Event()

    async def events():
        try:
            yield b"data: one\n\n"
            await asyncio.Event().wait()  # the worker is still generating
            yield b"data: never\n\n"
        finally:
            closed.set()

    async def receive() -> dict:
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if message.get("body") == b"data: one\n\n":
            left.set()

    await asyncio.wait_for(EventStream(events())({}, receive, send), 5)  # returns, raises nothing
    assert closed.is_set()  # the generator was closed: the worker's request is aborted with it
    assert [m.get("body") for m in sent[1:]] == [b"data: one\n\n"]
