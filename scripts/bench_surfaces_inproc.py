#!/usr/bin/env python
"""The part of a request's frontend CPU that differs between chat completions and the Responses
API, measured in this process (no server, no client: what `bench_surfaces.py` cannot resolve
on a loaded machine, where runs differ by +-10%).

Per request, as the two surfaces run it: parse the body (and, for Responses, translate it into
the chat request), shape 16 deltas of plain text (chat's chunks, or Responses' output items and
events), and write the answer (a whole body, or a stream's events; Responses also stores it).
The request path around this (admission, template, tokenizer, dispatch, HTTP) is the same code
for both and is left out. Responses run twice: stored (the default, in a store of 1000 as the
frontend's) and with `store: false` ("unstored"). They take turns, ROUNDS times; printed: the
best and median microseconds per request of each, and its ratio to chat.
Run: .venv/bin/python scripts/bench_surfaces_inproc.py [--rounds 7] [--requests 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from types import SimpleNamespace
from typing import Any

import msgspec
from starlette.responses import JSONResponse, Response

from dynvllm.frontend.openai import schema as oa
from dynvllm.frontend.openai.surface import _sse, chat_formatter
from dynvllm.frontend.postprocess import ChoiceDelta, Usage
from dynvllm.frontend.request_path import Part
from dynvllm.settings import Settings
from dynvllm_plugins.surfaces import responses as rs
from dynvllm_plugins.surfaces.responses_schema import parse, to_chat
from dynvllm_plugins.surfaces.responses_store import ResponseStore, Stored

TEXT = (
    "the quick red fox runs where the old mountain road meets the river and the city, "
    "then the small cat sees a dog near the house and the tree; what happens next?"
)
WORDS = [
    "the",
    " quick",
    " red",
    " fox",
    " runs",
    " where",
    " the",
    " old",
    " mountain",
    " road",
    " meets",
    " the",
    " river",
    " and",
    " the",
    " city",
]
_json = msgspec.json.Encoder().encode


def deltas() -> list[ChoiceDelta]:
    """16 tokens of text, the last one ending the choice at its length."""
    return [
        ChoiceDelta(0, w, [i + 5], None, "length" if i == len(WORDS) - 1 else None)
        for i, w in enumerate(WORDS)
    ]


def admitted() -> Any:
    """What the surfaces read of an admitted request: one part, its usage and headers."""
    post = SimpleNamespace(usage=Usage(40, 16, 0), tok=None)
    part = Part(list(range(40)), None, post)  # type: ignore[arg-type]
    entry = SimpleNamespace(tokenizer=None, sampling_defaults={})
    return SimpleNamespace(
        request_id=os.urandom(16).hex(),
        created=int(time.time()),
        model="m",
        parts=[part],
        entry=entry,
        headers=lambda: {"x-dynvllm-worker": "w"},
        usage=lambda: Usage(40, 16, 0),
    )


def chat(fmt: Any, stream: bool) -> Any:
    """OpenAISurface._serve / _complete / _stream, less the request path."""
    raw = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": TEXT}], "max_tokens": 16, "stream": stream}
    ).encode()

    def run() -> bytes:
        r = admitted()
        part = r.parts[0]
        req = oa.parse(oa.ChatRequest, raw)
        shaper = fmt.shaper(req, r.parts, req.n)
        rid = "chatcmpl-" + r.request_id
        if not stream:
            for d in deltas():
                shaper.chunk(0, part, d)
            body = {"id": rid, "object": "chat.completion", "created": r.created, "model": r.model}
            body |= {"choices": shaper.choices(), "usage": r.usage().as_dict(), **shaper.top()}
            return bytes(JSONResponse(body, headers=r.headers()).body)
        base = {"id": rid, "object": "chat.completion.chunk", "created": r.created, "model": r.model}
        out, top = [], shaper.top()
        for choice in shaper.opening():
            out.append(_sse({**base, "choices": [choice], **top}))
            top = {}
        for d in deltas():
            for choice in shaper.chunk(0, part, d):
                out.append(_sse({**base, "choices": [choice]}))
        out.append(b"data: [DONE]\n\n")
        return b"".join(out)

    return run


class _Unstored:
    """The store of a request sent with `store: false`."""

    def put(self, rid: str, stored: Stored) -> None:
        pass


def responses(fmt: Any, stream: bool, store: ResponseStore | _Unstored) -> Any:
    """ResponsesSurface.create / _stream, less the request path."""
    raw = json.dumps({"model": "m", "input": TEXT, "max_output_tokens": 16, "stream": stream}).encode()

    def run() -> bytes:
        r = admitted()
        part = r.parts[0]
        req = parse(raw)
        chat_req = to_chat(req, [])
        job = rs._Run(req, chat_req, r.entry, "resp_" + r.request_id, r.created)
        job.r = r
        shaper = fmt.shaper(chat_req, r.parts, 1)
        if not stream:
            for d in deltas():
                job.feed(shaper, 0, part, d)
            job.out.finish()
            body = job.encoded("done")
            store.put(job.id, Stored(body, job.conversation()))
            return bytes(Response(body, media_type="application/json", headers=r.headers()).body)
        out = job.out
        opening = job.encoded("in_progress")
        buf = [
            rs._body_event(out, "response.created", opening),
            rs._body_event(out, "response.in_progress", opening),
        ]
        for d in deltas():
            buf += job.events(shaper, 0, part, d)
        buf += out.finish_sse()
        encoded = job.encoded("done")
        store.put(job.id, Stored(encoded, job.conversation()))
        buf.append(rs._body_event(out, "response.incomplete", encoded))
        return b"".join(buf)

    return run


def per_request(fn: Any, n: int) -> float:
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    fmt = chat_formatter(Settings().frontend)
    store = ResponseStore(1000)
    print(f"in process, us of CPU per request; {args.rounds} rounds x {args.requests} requests, taking turns")
    print(
        f"{'mode':7s} {'surface':10s} {'best':>7s} {'median':>7s} {'bytes':>6s} {'ratio (best, median)':>21s}"
    )
    for stream in (False, True):
        runs = {
            "chat": chat(fmt, stream),
            "responses": responses(fmt, stream, store),
            "unstored": responses(fmt, stream, _Unstored()),
        }
        sizes = {name: len(fn()) for name, fn in runs.items()}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for k in range(args.rounds):
            for name in list(runs)[k % 3 :] + list(runs)[: k % 3]:
                times[name].append(per_request(runs[name], args.requests))
        best = {name: min(t) for name, t in times.items()}
        med = {name: statistics.median(t) for name, t in times.items()}
        for name in runs:
            ratio = f"{best[name] / best['chat']:.2f}, {med[name] / med['chat']:.2f}"
            print(
                f"{'stream' if stream else 'whole':7s} {name:10s} {best[name]:7.1f} {med[name]:7.1f} "
                f"{sizes[name]:6d} {ratio:>21s}"
            )


if __name__ == "__main__":
    main()
