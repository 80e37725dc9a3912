"""What a response's output looks like in the Responses API (pure logic).

`Output` turns the chat deltas of one choice (content, reasoning, tool calls, as the chat shaper
gives them) into output items and the events that stream them: an item is added, its content
part opened, text deltas sent, then done events close it, in OpenAI's order and with its
sequence numbers. The non-streamed answer is built by the same code (its events dropped), so a
stream and a plain request give the same items.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import msgspec

from dynvllm.frontend.postprocess import Usage

_json = msgspec.json.Encoder().encode
#: A text delta's event, as `sse` writes the dict `_text` would make (one per token in a stream).
_TEXT_DELTA = (
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":%d,'
    b'"output_index":%d,"item_id":"%s","content_index":0,"delta":%s,"logprobs":[]}\n\n'
)
#: A message's opening and closing events without logprobs, as `sse` writes the dicts `_open`
#: and `close` would make (once per message in a stream; the text is encoded once for all three).
_ITEM_ADDED = (
    b'event: response.output_item.added\ndata: {"type":"response.output_item.added","sequence_number":%d,'
    b'"output_index":%d,"item":{"id":"%s","type":"message","role":"assistant","status":"in_progress",'
    b'"content":[]}}\n\n'
)
_PART_ADDED = (
    b'event: response.content_part.added\ndata: {"type":"response.content_part.added","sequence_number":%d,'
    b'"output_index":%d,"item_id":"%s","content_index":0,"part":{"type":"output_text","text":"",'
    b'"annotations":[],"logprobs":[]}}\n\n'
)
_PART = b'{"type":"output_text","text":%s,"annotations":[],"logprobs":[]}'
_TEXT_DONE = (
    b'event: response.output_text.done\ndata: {"type":"response.output_text.done","sequence_number":%d,'
    b'"output_index":%d,"item_id":"%s","content_index":0,"text":%s,"logprobs":[]}\n\n'
)
_PART_DONE = (
    b'event: response.content_part.done\ndata: {"type":"response.content_part.done","sequence_number":%d,'
    b'"output_index":%d,"item_id":"%s","content_index":0,"part":%s}\n\n'
)
_ITEM_DONE = (
    b'event: response.output_item.done\ndata: {"type":"response.output_item.done","sequence_number":%d,'
    b'"output_index":%d,"item":{"id":"%s","type":"message","role":"assistant","status":"completed",'
    b'"content":[%s]}}\n\n'
)


def sse(event: dict[str, Any]) -> bytes:
    """An event as server-sent events carry it: its type on the event line, itself as data."""
    return b"event: " + event["type"].encode() + b"\ndata: " + _json(event) + b"\n\n"


def item_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(16).hex()}"


def _output_text(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


class Output:
    """Output items of one response and the events that stream them."""

    def __init__(self, events: bool = True) -> None:
        #: Whether text deltas make events (a stream); a whole answer needs only its items.
        self.events = events
        self.items: list[dict[str, Any]] = []
        self.seq = 0
        self.kind: str | None = None  # the open item's kind: "message" or "reasoning"
        self.id = ""
        self.text = ""
        self.reasoning = ""  # all reasoning text, for the usage's reasoning tokens
        #: Logprob entries (chat's shape, which is the Responses shape) of the open message, and
        #: those that came before a message opened (tokens held back, reasoning tokens).
        self.logprobs: list[dict[str, Any]] = []
        self.pending_logprobs: list[dict[str, Any]] = []

    def event(self, kind: str, **data: Any) -> dict[str, Any]:
        out = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return out

    @property
    def index(self) -> int:
        return len(self.items)

    # ---- text items (message, reasoning) ----------------------------------------------------
    def _open(self, kind: str) -> list[dict[str, Any]]:
        events = self.close()
        self.kind, self.text = kind, ""
        self.id = item_id("msg" if kind == "message" else "rs")
        if not self.events:
            return events
        if kind == "message":
            item: dict[str, Any] = {"id": self.id, "type": "message", "role": "assistant"}
            item |= {"status": "in_progress", "content": []}
            part: dict[str, Any] = _output_text("")
        else:
            item = {"id": self.id, "type": "reasoning", "summary": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        where = {"output_index": self.index, "item_id": self.id, "content_index": 0}
        return [
            *events,
            self.event("response.output_item.added", output_index=self.index, item=item),
            self.event("response.content_part.added", **where, part=part),
        ]

    def _text(
        self, kind: str, text: str, logprobs: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        events = self._open(kind) if self.kind != kind else []
        self.text += text
        if kind == "message":
            lps = logprobs or []
            if self.pending_logprobs:
                lps, self.pending_logprobs = [*self.pending_logprobs, *lps], []
            if lps:
                self.logprobs += lps
            if self.events:  # one per token: the dict `event` would make, written out
                events.append(
                    {
                        "type": "response.output_text.delta",
                        "sequence_number": self.seq,
                        "output_index": len(self.items),
                        "item_id": self.id,
                        "content_index": 0,
                        "delta": text,
                        "logprobs": lps,
                    }
                )
                self.seq += 1
        else:
            self.reasoning += text
            if self.events:
                where = {"output_index": self.index, "item_id": self.id, "content_index": 0}
                events.append(self.event("response.reasoning_text.delta", **where, delta=text))
        return events

    def add_text(self, text: str) -> None:
        """`step(text)` for a whole answer's message text (no logprobs), events dropped."""
        if self.kind == "message" and not self.events and not self.pending_logprobs:
            self.text += text
        else:
            self._text("message", text)

    def close(self) -> list[dict[str, Any]]:
        """Done events for the open text item, if any."""
        if self.kind is None:
            return []
        if self.kind == "message":
            lps, self.logprobs = [*self.logprobs, *self.pending_logprobs], []
            self.pending_logprobs = []
            part = _output_text(self.text, lps)
            item: dict[str, Any] = {"id": self.id, "type": "message", "role": "assistant"}
            item |= {"status": "completed", "content": [part]}
        else:
            part = {"type": "reasoning_text", "text": self.text}
            item = {"id": self.id, "type": "reasoning", "summary": [], "content": [part]}
            item["status"] = "completed"
        events = []
        if self.events:
            where = {"output_index": self.index, "item_id": self.id, "content_index": 0}
            if self.kind == "message":
                done = self.event("response.output_text.done", **where, text=self.text, logprobs=lps)
            else:
                done = self.event("response.reasoning_text.done", **where, text=self.text)
            events = [
                done,
                self.event("response.content_part.done", **where, part=part),
                self.event("response.output_item.done", output_index=self.index, item=item),
            ]
        self.items.append(item)
        self.kind = None
        return events

    # ---- function calls ------------------------------------------------------------------------
    def _call(self, call_id: str, name: str, args: str) -> list[dict[str, Any]]:
        events = self.close()
        head = {"id": item_id("fc"), "type": "function_call", "call_id": call_id, "name": name}
        item = {**head, "arguments": args, "status": "completed"}
        if self.events:
            where = {"output_index": self.index, "item_id": head["id"]}
            events += [
                self.event(
                    "response.output_item.added",
                    output_index=self.index,
                    item={**head, "arguments": "", "status": "in_progress"},
                ),
                self.event("response.function_call_arguments.delta", **where, delta=args),
                self.event("response.function_call_arguments.done", **where, name=name, arguments=args),
                self.event("response.output_item.done", output_index=self.index, item=item),
            ]
        self.items.append(item)
        return events

    # ---- driving -------------------------------------------------------------------------------
    def feed(
        self, delta: dict[str, Any], logprobs: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """Events for one chat delta (a chunk choice's `delta`, and its `logprobs.content`)."""
        calls = [
            (c["id"], c["function"]["name"], c["function"].get("arguments") or "")
            for c in delta.get("tool_calls") or ()
        ]
        return self.step(delta.get("content") or "", delta.get("reasoning_content") or "", calls, logprobs)

    def step(
        self,
        content: str,
        reasoning: str = "",
        calls: Sequence[tuple[str, str, str]] = (),
        logprobs: list[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """Events for one piece of a choice's output: its reasoning and content text, tool calls
        as (call id, name, arguments) and the logprob entries of its tokens."""
        events: list[dict[str, Any]] = []
        if reasoning:
            events += self._text("reasoning", reasoning)
        if content:
            events += self._text("message", content, logprobs)
        elif logprobs and self.kind == "message":
            # Tokens with no text of their own yet (held back, the end token): an empty delta
            # carries their entries, so the stream's deltas hold every token's, in order.
            events += self._text("message", "", logprobs)
        elif logprobs:
            self.pending_logprobs += logprobs
        for call in calls:
            events += self._call(*call)
        return events

    def step_sse(
        self,
        content: str,
        reasoning: str = "",
        calls: Sequence[tuple[str, str, str]] = (),
        logprobs: list[dict[str, Any]] | None = None,
    ) -> list[bytes]:
        """`step`'s events as `sse` writes them. Text for the open message and nothing else (the
        stream's hot path: one per token) is written straight to bytes, without its dict."""
        if content and not (reasoning or calls or logprobs or self.pending_logprobs):
            if self.kind == "message":
                self.text += content
                seq, self.seq = self.seq, self.seq + 1
                return [_TEXT_DELTA % (seq, len(self.items), self.id.encode(), _json(content))]
            if self.kind is None and self.events:  # a message opens with this text
                self.kind, self.text, self.id = "message", content, item_id("msg")
                seq, self.seq = self.seq, self.seq + 3
                where = (len(self.items), self.id.encode())
                return [
                    _ITEM_ADDED % (seq, *where),
                    _PART_ADDED % (seq + 1, *where),
                    _TEXT_DELTA % (seq + 2, *where, _json(content)),
                ]
        return [sse(e) for e in self.step(content, reasoning, calls, logprobs)]

    def finish_sse(self) -> list[bytes]:
        """`finish`'s events as `sse` writes them; a message without logprobs (the common end of
        a stream) is closed straight to bytes."""
        if self.kind == "message" and self.events and not (self.logprobs or self.pending_logprobs):
            text = _json(self.text)
            part = _PART % text
            seq, self.seq = self.seq, self.seq + 3
            where = (len(self.items), self.id.encode())
            done = [
                _TEXT_DONE % (seq, *where, text),
                _PART_DONE % (seq + 1, *where, part),
                _ITEM_DONE % (seq + 2, *where, part),
            ]
            part_dict = _output_text(self.text)
            item = {"id": self.id, "type": "message", "role": "assistant"}
            self.items.append(item | {"status": "completed", "content": [part_dict]})
            self.kind = None
            return done
        return [sse(e) for e in self.finish()]

    def finish(self) -> list[dict[str, Any]]:
        """Close the open item; an answer with no output at all still has its (empty) message."""
        if not self.items and self.kind is None:
            return [*self._open("message"), *self.close()]
        return self.close()


def usage(u: Usage, reasoning_tokens: int = 0) -> dict[str, Any]:
    """Token counts in the Responses shape."""
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def status(finish: str | None) -> tuple[str, dict[str, str] | None]:
    """A finished response's status and incomplete_details."""
    if finish == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None
