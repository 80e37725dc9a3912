"""What a response's output looks like in the Responses API (pure logic).

`Output` turns the chat deltas of one choice (content, reasoning, tool calls, as the chat shaper
gives them) into output items and the events that stream them: an item is added, its content
part opened, text deltas sent, then done events close it, in OpenAI's order and with its
sequence numbers. The non-streamed answer is built by the same code (its events dropped), so a
stream and a plain request give the same items.
"""

from __future__ import annotations

import os
from typing import Any

from dynvllm.frontend.postprocess import Usage


def item_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(16).hex()}"


def _output_text(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


class Output:
    """Output items of one response and the events that stream them."""

    def __init__(self) -> None:
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
        if kind == "message":
            self.id = item_id("msg")
            item: dict[str, Any] = {"id": self.id, "type": "message", "role": "assistant"}
            item |= {"status": "in_progress", "content": []}
            part: dict[str, Any] = _output_text("")
        else:
            self.id = item_id("rs")
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
        where = {"output_index": self.index, "item_id": self.id, "content_index": 0}
        if kind == "message":
            lps = [*self.pending_logprobs, *(logprobs or ())]
            self.pending_logprobs = []
            self.logprobs += lps
            events.append(self.event("response.output_text.delta", **where, delta=text, logprobs=lps))
        else:
            self.reasoning += text
            events.append(self.event("response.reasoning_text.delta", **where, delta=text))
        return events

    def close(self) -> list[dict[str, Any]]:
        """Done events for the open text item, if any."""
        if self.kind is None:
            return []
        where = {"output_index": self.index, "item_id": self.id, "content_index": 0}
        if self.kind == "message":
            lps, self.logprobs = [*self.logprobs, *self.pending_logprobs], []
            self.pending_logprobs = []
            part = _output_text(self.text, lps)
            done = self.event("response.output_text.done", **where, text=self.text, logprobs=lps)
            item: dict[str, Any] = {"id": self.id, "type": "message", "role": "assistant"}
            item |= {"status": "completed", "content": [part]}
        else:
            part = {"type": "reasoning_text", "text": self.text}
            done = self.event("response.reasoning_text.done", **where, text=self.text)
            item = {"id": self.id, "type": "reasoning", "summary": [], "content": [part]}
            item["status"] = "completed"
        events = [
            done,
            self.event("response.content_part.done", **where, part=part),
            self.event("response.output_item.done", output_index=self.index, item=item),
        ]
        self.items.append(item)
        self.kind = None
        return events

    # ---- function calls ------------------------------------------------------------------------
    def _call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.close()
        fn = call["function"]
        args = fn.get("arguments") or ""
        head = {"id": item_id("fc"), "type": "function_call", "call_id": call["id"], "name": fn["name"]}
        where = {"output_index": self.index, "item_id": head["id"]}
        item = {**head, "arguments": args, "status": "completed"}
        events += [
            self.event(
                "response.output_item.added",
                output_index=self.index,
                item={**head, "arguments": "", "status": "in_progress"},
            ),
            self.event("response.function_call_arguments.delta", **where, delta=args),
            self.event("response.function_call_arguments.done", **where, name=fn["name"], arguments=args),
            self.event("response.output_item.done", output_index=self.index, item=item),
        ]
        self.items.append(item)
        return events

    # ---- driving -------------------------------------------------------------------------------
    def feed(
        self, delta: dict[str, Any], logprobs: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        """Events for one chat delta (a chunk choice's `delta`, and its `logprobs.content`)."""
        events: list[dict[str, Any]] = []
        if delta.get("reasoning_content"):
            events += self._text("reasoning", delta["reasoning_content"])
        if delta.get("content"):
            events += self._text("message", delta["content"], logprobs)
        elif logprobs and self.kind == "message":
            # Tokens with no text of their own yet (held back, the end token): an empty delta
            # carries their entries, so the stream's deltas hold every token's, in order.
            events += self._text("message", "", logprobs)
        elif logprobs:
            self.pending_logprobs += logprobs
        for call in delta.get("tool_calls") or ():
            events += self._call(call)
        return events

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
