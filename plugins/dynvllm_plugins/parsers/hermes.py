"""Hermes-style tool calls (Qwen2.5/3, Hermes and many others), one block per call:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; text before the first block is content."""

from __future__ import annotations

import json
import re

from dynvllm.frontend.parsers import ToolCall, ToolParser, partial_suffix

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


class HermesToolParser(ToolParser):
    def find_start(self, text: str) -> int | None:
        i = text.find(OPEN)
        return i if i >= 0 else None

    def hold(self, text: str) -> int:
        return partial_suffix(text, OPEN)

    def parse_calls(self, region: str) -> list[ToolCall] | None:
        calls = []
        for body in _BLOCK.findall(region):
            try:
                obj = json.loads(body)
            except ValueError:
                return None
            if not isinstance(obj, dict) or "name" not in obj:
                return None
            calls.append(ToolCall.of(obj["name"], obj.get("arguments", obj.get("parameters", {}))))
        return calls or None
