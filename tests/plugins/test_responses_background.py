"""What the Responses and Messages surfaces write straight to bytes equals what the dict path
writes, and the store's background parts: event logs read from any point, stored bodies as bytes,
runs cancelled when their response leaves the store (pure)."""

from __future__ import annotations

import asyncio
import itertools
import json

import msgspec

from dynvllm.frontend.event_stream import Last
from dynvllm_plugins.surfaces import anthropic
from dynvllm_plugins.surfaces import responses_output as ro
from dynvllm_plugins.surfaces.responses import _body_event
from dynvllm_plugins.surfaces.responses_store import EventLog, ResponseStore, Stored

STEPS = [
    ("", "hm", (), None),
    ("he", "", (), None),
    ("llo", "", (), None),
    ("", "", (), [{"token": "x", "logprob": -1.0, "bytes": [120], "top_logprobs": []}]),
    (" wor", "", (), [{"token": " wor", "logprob": -0.5, "bytes": [32], "top_logprobs": []}]),
    ("ld", "", (), None),
    ("", "", [("call_1", "f", '{"a": "é"}')], None),
    ("more", "", (), None),
    ('"quoted" \\ text\n', "", (), None),
]


def _run(monkeypatch, encode) -> list[bytes]:
    """The events of STEPS, item ids numbered from 0 (they are random otherwise)."""
    counter = itertools.count()
    monkeypatch.setattr(ro, "item_id", lambda prefix: f"{prefix}_{next(counter)}")
    out = ro.Output()
    return [w for step in STEPS for w in encode(out, step)] + [ro.sse(e) for e in out.finish()]


def test_stream_bytes_equal_the_encoded_event_dicts(monkeypatch):
    wrote = _run(monkeypatch, lambda out, step: out.step_sse(*step))
    want = _run(monkeypatch, lambda out, step: [ro.sse(e) for e in out.step(*step)])
    assert wrote == want
    events = [json.loads(w.split(b"\ndata: ", 1)[1]) for w in wrote]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert sum(e["type"] == "response.output_text.delta" for e in events) == 7


def test_a_body_event_is_the_encoded_event_with_its_body():
    body = {"id": "resp_1", "status": "in_progress", "output": [], "text": "é\n"}
    a, b = ro.Output(), ro.Output()
    a.seq = b.seq = 7
    encoded = msgspec.json.encode(body)
    assert _body_event(a, "response.created", encoded) == ro.sse(b.event("response.created", response=body))
    assert a.seq == b.seq == 8


def test_anthropic_text_deltas_are_written_as_their_events():
    for block, text in ((0, "plain"), (3, 'a "quote" \\ é\n\t')):
        want = anthropic._event(
            "content_block_delta", {"index": block, "delta": {"type": "text_delta", "text": text}}
        )
        assert anthropic._text_delta(block, text) == want


async def test_an_event_log_is_read_from_any_point_as_it_grows():
    log = EventLog()
    log.add([b"e0", b"e1"])

    async def read(after: int) -> list[bytes]:
        return [bytes(x) for x in [x async for x in log.follow(after)]]

    early = asyncio.ensure_future(read(-1))
    late = asyncio.ensure_future(read(1))
    await asyncio.sleep(0)
    log.add([b"e2"])
    await asyncio.sleep(0)
    log.add([b"e3"], end=True)
    assert b"".join(await early) == b"e0e1e2e3" and b"".join(await late) == b"e2e3"
    got = [x async for x in log.follow(2)]
    assert got == [b"e3"] and isinstance(got[0], Last)


async def test_stored_bodies_and_background_runs_in_the_store():
    done = Stored(msgspec.json.encode({"id": "a", "status": "completed"}), lambda: [{"role": "user"}])
    assert done.body["status"] == "completed" and not done.running
    assert done.encoded() == b'{"id":"a","status":"completed"}' and done.conversation == [{"role": "user"}]
    running = Stored({"id": "b", "status": "in_progress"}, [])
    assert running.running
    running.task = asyncio.ensure_future(asyncio.sleep(60))
    store = ResponseStore(1)
    store.put("b", running)
    store.put("a", done)  # evicts "b": nobody can read it any more, so its run stops
    await asyncio.sleep(0)
    assert running.task.cancelled() and store.get("b") is None
