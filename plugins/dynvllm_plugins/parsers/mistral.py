"""Mistral tool calls after `[TOOL_CALLS]`: a JSON array of {"name", "arguments"} (v3 tokenizers),
or `name[ARGS]{...}` repeated (v11+ tokenizers)."""

from __future__ import annotations

import json

from dynvllm.frontend.parsers import ToolCall, ToolParser, partial_suffix

MARK, ARGS = "[TOOL_CALLS]", "[ARGS]"


class MistralToolParser(ToolParser):
    def find_start(self, text: str) -> int | None:
        i = text.find(MARK)
        return i if i >= 0 else None

    def hold(self, text: str) -> int:
        return partial_suffix(text, MARK)

    def parse_calls(self, region: str) -> list[ToolCall] | None:
        body = region[len(MARK) :].strip()
        if body.startswith("["):
            try:
                items = json.loads(body)
            except ValueError:
                return None
            if not isinstance(items, list) or not all(isinstance(x, dict) and "name" in x for x in items):
                return None
            return [ToolCall.of(x["name"], x.get("arguments", {})) for x in items] or None
        calls = []
        for part in body.split(MARK):
            name, sep, args = part.strip().partition(ARGS)
            if not sep or not name:
                return None
            try:
                json.loads(args)
            except ValueError:
                return None
            calls.append(ToolCall(name.strip(), args.strip()))
        return calls or None
