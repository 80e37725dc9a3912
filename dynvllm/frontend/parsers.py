"""Tool-call and reasoning parsers: what a plugin provides, and the streaming drivers around them.

Plugins (entry-point groups `dynvllm.tool_parsers`, `dynvllm.reasoning_parsers`) are pure code:
no vLLM, no torch. A parser only says where its markup starts and how to read a finished
region; the drivers here stream around it and hold back text that may still turn out to be
markup. A whole output is parsed by feeding it to the same driver at once, so a stream split at
any character boundary gives the same result as the non-streamed response.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's API carries it
    id: str = field(default_factory=_call_id)

    @classmethod
    def of(cls, name: str, arguments: object) -> ToolCall:
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return cls(str(name), text)


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolParser:
    """Base class of tool-call parsers: model text -> content and tool calls."""

    def find_start(self, text: str) -> int | None:
        """Index in `text` (the output so far) where tool-call markup begins, or None. Once it
        returns an index for some text, it returns the same index for every extension of it."""
        raise NotImplementedError

    def hold(self, text: str) -> int:
        """How many trailing characters of `text` may still become the start of markup."""
        return 0

    def parse_calls(self, region: str) -> list[ToolCall] | None:
        """The calls in the region that starts at `find_start` and runs to the end of the output;
        None if it does not parse (the region is then returned as content)."""
        raise NotImplementedError


class ToolStream:
    """Streams content up to the tool-call markup; parses the markup when the output ends."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.buf = ""
        self.sent = 0
        self.start: int | None = None

    def feed(self, text: str) -> str:
        """Content that is now safe to stream."""
        self.buf += text
        if self.start is not None:
            return ""
        start = self.parser.find_start(self.buf)
        if start is not None:
            self.start = start
            out, self.sent = self.buf[self.sent : start], start
            return out
        safe = len(self.buf) - self.parser.hold(self.buf)
        if safe <= self.sent:
            return ""
        out, self.sent = self.buf[self.sent : safe], safe
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not streamed yet, tool calls) at the end of the output."""
        rest = self.buf[self.sent :]
        self.sent = len(self.buf)
        if self.start is None:
            return rest, []
        calls = self.parser.parse_calls(rest)
        if not calls:
            return rest, []
        return "", calls


def parse_tools(parser: ToolParser, text: str) -> tuple[str, list[ToolCall]]:
    stream = ToolStream(parser)
    head = stream.feed(text)
    rest, calls = stream.finish()
    return head + rest, calls


class ReasoningParser:
    """Base class of reasoning parsers: `<think>...</think>` style markup."""

    start = "<think>"
    end = "</think>"
    #: The output begins inside reasoning (the chat template opened it); else reasoning must
    #: open at the start of the output.
    opens_in_reasoning = False


class ReasoningStream:
    """Splits streamed text into (reasoning, content) increments."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.p = parser
        self.buf = ""
        self.sent = 0
        # undecided -> reasoning -> content
        self.state = "undecided"
        self.reasoning_from = 0

    def _decide(self) -> None:
        p, stripped = self.p, self.buf.lstrip()
        if stripped.startswith(p.start):
            self.state = "reasoning"
            self.reasoning_from = self.sent = len(self.buf) - len(stripped) + len(p.start)
        elif p.start.startswith(stripped) and stripped:
            return  # may still become the opening marker
        elif not stripped:
            return
        elif p.opens_in_reasoning:
            self.state = "reasoning"
        else:
            self.state = "content"

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        if self.state == "undecided":
            self._decide()
        if self.state == "undecided":
            return "", ""
        if self.state == "content":
            out, self.sent = self.buf[self.sent :], len(self.buf)
            return "", out
        end = self.buf.find(self.p.end, self.sent)
        if end >= 0:
            reasoning = self.buf[self.sent : end]
            self.state = "content"
            self.sent = end + len(self.p.end)
            content = self.buf[self.sent :]
            self.sent = len(self.buf)
            return reasoning, content
        safe = len(self.buf) - partial_suffix(self.buf, self.p.end)
        out, self.sent = self.buf[self.sent : max(safe, self.sent)], max(safe, self.sent)
        return out, ""

    def finish(self) -> tuple[str, str]:
        rest = self.buf[self.sent :]
        self.sent = len(self.buf)
        if self.state == "reasoning":
            return rest, ""
        if self.state == "undecided" and self.p.opens_in_reasoning:
            return rest, ""
        return "", rest


def parse_reasoning(parser: ReasoningParser, text: str) -> tuple[str, str]:
    stream = ReasoningStream(parser)
    r1, c1 = stream.feed(text)
    r2, c2 = stream.finish()
    return r1 + r2, c1 + c2
