"""What one chat choice's text becomes: content, reasoning_content and tool calls (pure).

Reasoning is split off first (`--reasoning-parser`), then tool calls are read from the content:
by the `--tool-call-parser` for tool_choice `auto`, or as the JSON that structured outputs forced
for `required` and a named function.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from dynvllm.frontend.parsers import ReasoningParser, ReasoningStream, ToolCall, ToolParser, ToolStream


@dataclass
class ChatDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


class _Forced(ToolParser):
    """The whole output is the JSON that structured outputs forced: a named function's
    arguments, or for `required` an array of {name, parameters}."""

    def __init__(self, name: str | None) -> None:
        self.name = name

    def find_start(self, text: str) -> int | None:
        return 0

    def parse_calls(self, region: str) -> list[ToolCall] | None:
        try:
            obj = json.loads(region)
        except ValueError:
            return None  # cut short (max_tokens): the client gets the text
        if self.name is not None:
            return [ToolCall.of(self.name, obj)]
        if not isinstance(obj, list):
            return None
        calls = [
            ToolCall.of(x["name"], x.get("parameters", {}))
            for x in obj
            if isinstance(x, dict) and "name" in x
        ]
        return calls or None


class ChoiceOutput:
    def __init__(
        self,
        reasoning: ReasoningParser | None = None,
        tools: ToolParser | None = None,
        forced: str | None = None,
        forced_name: str | None = None,
    ) -> None:
        self.reasoning = ReasoningStream(reasoning) if reasoning else None
        if forced is not None:
            tools = _Forced(forced_name)
        self.tools = ToolStream(tools) if tools else None
        self.called = False

    def _content(self, text: str) -> str:
        return self.tools.feed(text) if self.tools else text

    def feed(self, text: str) -> ChatDelta:
        if self.reasoning is not None:
            reasoning, content = self.reasoning.feed(text)
        else:
            reasoning, content = "", text
        return ChatDelta(self._content(content) if content else "", reasoning)

    def finish(self) -> ChatDelta:
        reasoning, content = self.reasoning.finish() if self.reasoning else ("", "")
        out = ChatDelta(self._content(content) if content else "", reasoning)
        if self.tools is not None:
            rest, calls = self.tools.finish()
            out.content += rest
            out.tool_calls = calls
            self.called = bool(calls)
        return out

    def step(self, text: str, ids: list[int], finished: bool) -> ChatDelta:
        """The output of one delta of generated text (`ids` are its tokens), with what the end of
        the output releases when `finished`."""
        out = self.feed(text) if text else ChatDelta()
        if finished:
            tail = self.finish()
            out = ChatDelta(out.content + tail.content, out.reasoning + tail.reasoning, tail.tool_calls)
        return out
