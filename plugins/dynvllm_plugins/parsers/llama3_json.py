"""Llama 3.x JSON tool calls: the whole output is `{"name": ..., "parameters": {...}}`, optionally
after `<|python_tag|>`, several separated by `;`."""

from __future__ import annotations

import json

from dynvllm.frontend.parsers import ToolCall, ToolParser

TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    def find_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        # The whole output is the region (leading whitespace included): no stray content.
        return 0 if stripped.startswith(TAG) or stripped.startswith("{") else None

    def hold(self, text: str) -> int:
        stripped = text.lstrip()
        if not stripped or TAG.startswith(stripped):
            return len(text)  # nothing decided yet: whitespace, or a beginning of the tag
        return 0

    def parse_calls(self, region: str) -> list[ToolCall] | None:
        text = region.strip()
        text = text.removeprefix(TAG).strip()
        decoder = json.JSONDecoder()
        calls, i = [], 0
        while i < len(text):
            try:
                obj, end = decoder.raw_decode(text, i)
            except ValueError:
                return None
            if not isinstance(obj, dict) or "name" not in obj:
                return None
            calls.append(ToolCall.of(obj["name"], obj.get("parameters", obj.get("arguments", {}))))
            i = end
            while i < len(text) and text[i] in " \n\t;":
                i += 1
        return calls or None
