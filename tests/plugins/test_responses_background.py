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


#: A stream of plain text, the common case: the message opens and closes straight to bytes.
PLAIN = [("he", "", (), None), ("llo", "", (), None), (' "q" \\ 100% é\n', "", (), None)]


def _events(monkeypatch, steps, fast: bool) -> tuple[list[bytes], list]:
    counter = itertools.count()
    monkeypatch.setattr(ro, "item_id", lambda prefix: f"{prefix}_{next(counter)}")
    out = ro.Output()
    if fast:
        wrote = [w for step in steps for w in out.step_sse(*step)] + out.finish_sse()
    else:
        wrote = [ro.sse(e) for step in steps for e in out.step(*step)] + [ro.sse(e) for e in out.finish()]
    return wrote, out.items


def test_a_message_opens_and_closes_as_its_encoded_event_dicts(monkeypatch):
    # Plain text; reasoning first; a message with logprobs (closed the dict way); a tool call last.
    for steps in (PLAIN, STEPS[:3], STEPS[:5], STEPS, PLAIN[:1] + STEPS[6:7]):
        fast, items = _events(monkeypatch, steps, fast=True)
        assert (fast, items) == _events(monkeypatch, steps, fast=False)
    wrote = b"".join(_events(monkeypatch, PLAIN, fast=True)[0])
    events = [json.loads(e.split(b"\ndata: ", 1)[1]) for e in wrote.split(b"\n\n") if e]
    assert [e["type"].split(".", 1)[1] for e in events] == [
        "output_item.added",
        "content_part.added",
        *["output_text.delta"] * 3,
        "output_text.done",
        "content_part.done",
        "output_item.done",
    ]
    assert events[-1]["item"]["content"][0]["text"] == "hello" + PLAIN[2][0]


def test_a_whole_answers_text_makes_the_items_step_makes(monkeypatch):
    a, b = ro.Output(events=False), ro.Output(events=False)
    for out, add in ((a, a.add_text), (b, b.step)):
        counter = itertools.count()
        monkeypatch.setattr(ro, "item_id", lambda prefix, c=counter: f"{prefix}_{next(c)}")
        out.step("", "think")
        add("he")
        add("llo")
        out.step("", "", [("call_1", "f", "{}")])
        add("after")
        out.finish()
    assert a.items == b.items and len(a.items) == 4


def test_a_response_body_encoded_from_its_template_is_the_encoded_body():
    from types import SimpleNamespace

    from dynvllm.frontend.postprocess import Usage
    from dynvllm.frontend.request_path import Part
    from dynvllm_plugins.surfaces import responses
    from dynvllm_plugins.surfaces.responses_schema import parse, to_chat

    entry = SimpleNamespace(tokenizer=None, sampling_defaults={"top_p": 0.5})
    for body in (
        {"model": "m", "input": "hi"},
        {
            "model": "m %d %s",
            "input": "hi",
            "instructions": 'be 100% brief: é \\ "',
            "metadata": {"k": "%(x)s"},
            "max_output_tokens": 7,
            "temperature": 0.2,
            "text": {"format": {"type": "json_object"}},
            "reasoning": {"effort": "low"},
            "tools": [{"type": "function", "name": "f", "parameters": {}}],
            "tool_choice": "required",
            "stream": True,
        },
    ):
        req = parse(json.dumps(body).encode())
        run = responses._Run(req, to_chat(req), entry, "resp_1", 1700000000)
        run.r = SimpleNamespace(parts=[Part([1, 2], None, SimpleNamespace(usage=Usage(2, 3, 1)))])
        run.out.step("x%sy")
        run.out.finish()
        for finish in (None, "length"):
            run.finish = finish
            for state in ("queued", "in_progress", "done", "cancelled"):
                assert run.encoded(state) == msgspec.json.encode(run.body(state)), (state, finish)
        run.error = {"code": "x", "message": "%s failed"}
        assert run.encoded("failed") == msgspec.json.encode(run.body("failed"))
