"""Tool-call and reasoning parsers on recorded model outputs; streaming split at every character
boundary must give what the whole output gives."""

from __future__ import annotations

import json

import pytest

from dynvllm import registry
from dynvllm.frontend.chat_output import ChoiceOutput
from dynvllm.frontend.parsers import ReasoningStream, ToolStream, parse_reasoning, parse_tools

TOOLS = [
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "Let me check.\n",
        [("get_weather", {"city": "Paris"}), ("get_time", {})],
    ),
    (
        "hermes",
        "No tools needed: 2 < 3 and <tool is not a tag.",
        "No tools needed: 2 < 3 and <tool is not a tag.",
        [],
    ),
    ("hermes", "Broken <tool_call>{not json}</tool_call>", "Broken <tool_call>{not json}</tool_call>", []),
    (
        "llama3_json",
        ' {"name": "search", "parameters": {"q": "vllm", "k": 3}}; {"name": "get_time", "parameters": {}}',
        "",
        [("search", {"q": "vllm", "k": 3}), ("get_time", {})],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "search", "parameters": {"q": "a;b"}}',
        "",
        [("search", {"q": "a;b"})],
    ),
    ("llama3_json", "The answer is {maybe}.", "The answer is {maybe}.", []),
    (
        "mistral",
        'Sure.[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]',
        "Sure.",
        [("add", {"a": 1, "b": 2})],
    ),
    (
        "mistral",
        '[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}[TOOL_CALLS]neg[ARGS]{"x": -1}',
        "",
        [("add", {"a": 1, "b": 2}), ("neg", {"x": -1})],
    ),
    (
        "pythonic",
        '[get_weather(city="San Francisco", unit="c"), get_time(tz=None, hours=[1, 2])]',
        "",
        [
            ("get_weather", {"city": "San Francisco", "unit": "c"}),
            ("get_time", {"tz": None, "hours": [1, 2]}),
        ],
    ),
    ("pythonic", "[this is not python]", "[this is not python]", []),
    ("pythonic", "Plain answer.", "Plain answer.", []),
]


def _parser(group: str, name: str):
    return registry.load(group, name)()


@pytest.mark.parametrize("name,text,content,calls", TOOLS)
def test_tool_parsers_read_recorded_outputs(name, text, content, calls):
    got_content, got_calls = parse_tools(_parser(registry.TOOL_PARSERS, name), text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert len({c.id for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("name,text,content,calls", TOOLS)
def test_tool_streams_split_anywhere_equal_the_whole(name, text, content, calls):
    for cut in range(len(text) + 1):
        for pieces in ([text[:cut], text[cut:]], list(text)):
            stream = ToolStream(_parser(registry.TOOL_PARSERS, name))
            streamed = "".join(stream.feed(p) for p in pieces)
            rest, got = stream.finish()
            assert streamed + rest == content, (cut, streamed, rest)
            assert [(c.name, json.loads(c.arguments)) for c in got] == calls
        if cut > 3:
            break  # every single-character split is covered by list(text) above


REASONING = [
    ("deepseek_r1", "Thinking about it.</think>The answer is 4.", "Thinking about it.", "The answer is 4."),
    ("deepseek_r1", "<think>\nhmm</think>\n\nok", "\nhmm", "\n\nok"),
    ("deepseek_r1", "still thinking when cut off", "still thinking when cut off", ""),
    ("qwen3", "<think>\nlet me see</think>\n\nParis.", "\nlet me see", "\n\nParis."),
    ("qwen3", "Paris, without thinking.", "", "Paris, without thinking."),
    ("qwen3", "  <think>unfinished", "unfinished", ""),
    ("qwen3", "<thinking is not the tag>", "", "<thinking is not the tag>"),
]


@pytest.mark.parametrize("name,text,reasoning,content", REASONING)
def test_reasoning_parsers_split_think_blocks(name, text, reasoning, content):
    assert parse_reasoning(_parser(registry.REASONING_PARSERS, name), text) == (reasoning, content)
    for cut in range(len(text) + 1):
        for pieces in ([text[:cut], text[cut:]], list(text)):
            stream = ReasoningStream(_parser(registry.REASONING_PARSERS, name))
            parts = [stream.feed(p) for p in pieces] + [stream.finish()]
            assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == (reasoning, content)


def test_reasoning_then_tools_in_one_choice():
    text = '<think>need weather</think>On it.<tool_call>{"name": "w", "arguments": {"c": "Oslo"}}</tool_call>'
    whole = ChoiceOutput(
        _parser(registry.REASONING_PARSERS, "qwen3"), _parser(registry.TOOL_PARSERS, "hermes")
    )
    first, last = whole.feed(text), whole.finish()
    for cut in range(len(text) + 1):
        out = ChoiceOutput(
            _parser(registry.REASONING_PARSERS, "qwen3"), _parser(registry.TOOL_PARSERS, "hermes")
        )
        a, b, end = out.feed(text[:cut]), out.feed(text[cut:]), out.finish()
        assert a.reasoning + b.reasoning + end.reasoning == first.reasoning + last.reasoning == "need weather"
        assert a.content + b.content + end.content == first.content + last.content == "On it."
        assert [(c.name, c.arguments) for c in end.tool_calls] == [("w", '{"c": "Oslo"}')]


def test_forced_calls_parse_the_constrained_json():
    named = ChoiceOutput(forced="named", forced_name="lookup")
    named.feed('{"id": 7}')
    assert [(c.name, json.loads(c.arguments)) for c in named.finish().tool_calls] == [("lookup", {"id": 7})]
    required = ChoiceOutput(forced="required")
    required.feed('[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]')
    assert [(c.name, json.loads(c.arguments)) for c in required.finish().tool_calls] == [
        ("a", {"x": 1}),
        ("b", {}),
    ]
    cut = ChoiceOutput(forced="required")
    cut.feed('[{"name": "a", "param')
    end = cut.finish()
    assert end.tool_calls == [] and end.content == '[{"name": "a", "param' and not cut.called
