"""Pythonic tool calls (Llama 3.2/4, ToolACE): the whole output is a Python list of calls,
`[get_weather(city="Paris"), get_time()]`, with literal arguments."""

from __future__ import annotations

import ast

from dynvllm.frontend.parsers import ToolCall, ToolParser


class PythonicToolParser(ToolParser):
    def find_start(self, text: str) -> int | None:
        return 0 if text.lstrip().startswith("[") else None

    def hold(self, text: str) -> int:
        return len(text) if not text.strip() else 0

    def parse_calls(self, region: str) -> list[ToolCall] | None:
        try:
            tree = ast.parse(region.strip(), mode="eval")
        except SyntaxError:
            return None
        if not isinstance(tree.body, ast.List):
            return None
        calls = []
        for node in tree.body.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                return None
            try:
                args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
            except ValueError:
                return None
            calls.append(ToolCall.of(node.func.id, args))
        return calls or None
