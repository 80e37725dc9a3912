"""The held-out battery of scripts/parity_vllm_server.py: requests for OpenAI chat and
completions, Responses, Anthropic Messages and bad inputs, all greedy, on the tiny model (served
as "tiny"). Each `Case` names how it is sent (`kind`: which SDK call, streamed or not, or raw
HTTP)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NAME = "tiny"

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 8}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
USER = [{"role": "user", "content": "the cat sees a dog and"}]
TALK = [
    {"role": "system", "content": "answer with one word"},
    {"role": "user", "content": "red river runs where"},
    {"role": "assistant", "content": "the old mountain"},
    {"role": "user", "content": "and then the city?"},
]


@dataclass
class Case:
    name: str
    endpoint: str
    kind: str
    body: dict = field(default_factory=dict)
    raw: bytes | None = None  # an `http` case's body sent as is (bad JSON)
    method: str = "POST"


def _chat(name: str, kind: str = "chat", **body: Any) -> Case:
    return Case(name, "chat", kind, {"model": NAME, "temperature": 0, "max_tokens": 12, **body})


def _comp(name: str, kind: str = "completion", **body: Any) -> Case:
    return Case(name, "completions", kind, {"model": NAME, "temperature": 0, "max_tokens": 10, **body})


def _resp(name: str, kind: str = "responses", **body: Any) -> Case:
    return Case(name, "responses", kind, {"model": NAME, "temperature": 0, "max_output_tokens": 12, **body})


def _msg(name: str, kind: str = "messages", **body: Any) -> Case:
    return Case(name, "messages", kind, {"model": NAME, "temperature": 0, "max_tokens": 12, **body})


def _bad(name: str, path: str, body: Any = None, raw: bytes | None = None) -> Case:
    return Case(name, path, "http", body if isinstance(body, dict) else {}, raw=raw)


BATTERY: list[Case] = [
    # OpenAI chat completions
    _chat("chat.basic", messages=USER),
    _chat("chat.multiturn", messages=TALK),
    _chat("chat.stop", messages=USER, max_tokens=30, stop=["the", "a"]),
    _chat("chat.include_stop", messages=USER, max_tokens=30, stop=["the"], include_stop_str_in_output=True),
    _chat("chat.n2", messages=USER, n=2, max_tokens=6),
    _chat("chat.logprobs", messages=USER, max_tokens=6, logprobs=True, top_logprobs=3),
    _chat("chat.max_tokens_1", messages=TALK, max_tokens=1),
    _chat(
        "chat.json_schema",
        messages=USER,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "ab", "schema": SCHEMA}},
    ),
    _chat(
        "chat.tools_named",
        messages=USER,
        max_tokens=60,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ),
    _chat("chat.tools_required", messages=USER, max_tokens=80, tools=[WEATHER], tool_choice="required"),
    _chat("chat.tools_auto", messages=USER, tools=[WEATHER], tool_choice="auto"),
    _chat(
        "chat.continue_final_echo",
        messages=[*USER, {"role": "assistant", "content": "the old"}],
        continue_final_message=True,
        add_generation_prompt=False,
        echo=True,
    ),
    _chat("chat.template_kwargs", messages=USER, chat_template_kwargs={"enable_thinking": False}),
    _chat("chat.return_token_ids", messages=USER, max_tokens=5, return_token_ids=True),
    _chat("chat.seed", messages=USER, temperature=0.9, seed=7),
    _chat("chat.stream", kind="chat_stream", messages=TALK, stream_options={"include_usage": True}),
    _chat(
        "chat.stream_logprobs",
        kind="chat_stream",
        messages=USER,
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
    ),
    # OpenAI completions
    _comp("comp.basic", prompt="the quick dog"),
    _comp("comp.batch", prompt=["one red fish", "big old tree"], max_tokens=5),
    _comp("comp.token_ids", prompt=[10, 20, 30, 40]),
    _comp("comp.logprobs", prompt="the quick dog", max_tokens=5, logprobs=3),
    _comp("comp.echo_loglikelihood", prompt="the quick dog runs", max_tokens=0, echo=True, logprobs=1),
    _comp(
        "comp.stream",
        kind="completion_stream",
        prompt="the quick dog",
        stream_options={"include_usage": True},
    ),
    _comp("comp.return_token_ids", prompt="the quick dog", max_tokens=4, return_token_ids=True),
    # Responses
    _resp("resp.instructions", input="the cat sees a dog and", instructions="answer briefly"),
    _resp(
        "resp.stateless_multiturn",
        input=[
            {"role": "user", "content": "red river runs where"},
            {"role": "assistant", "content": "the old mountain"},
            {"role": "user", "content": "and then?"},
        ],
    ),
    _resp(
        "resp.json_schema",
        input="give a and b",
        max_output_tokens=60,
        text={"format": {"type": "json_schema", "name": "ab", "schema": SCHEMA}},
    ),
    _resp("resp.stream", "responses_stream", input="the cat sees a dog and"),
    _resp("resp.store_retrieve", "responses_store", input="one red fish", store=True),
    _resp("resp.previous_response_id", "responses_previous", input="one red fish", store=True),
    _resp(
        "resp.tools_auto",
        input="weather in Paris?",
        tools=[{"type": "function", **WEATHER["function"]}],
    ),
    # Anthropic Messages
    _msg("msg.system", system="answer with one word", messages=USER),
    _msg("msg.multiturn", messages=TALK[1:]),
    _msg("msg.stop_sequences", messages=USER, max_tokens=30, stop_sequences=["the", "a"]),
    _msg(
        "msg.tools_history",
        messages=[
            {"role": "user", "content": "weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}],
            },
        ],
        tools=[
            {
                "name": "get_weather",
                "description": "Weather of a city",
                "input_schema": WEATHER["function"]["parameters"],
            }
        ],
    ),
    _msg("msg.stream", "messages_stream", system="answer with one word", messages=USER),
    Case(
        "msg.count_tokens",
        "messages/count_tokens",
        "count_tokens",
        {"model": NAME, "system": "answer with one word", "messages": TALK[1:]},
    ),
    # Bad inputs: status and error type
    _bad("bad.unknown_model", "/v1/chat/completions", {"model": "nope", "messages": USER}),
    _bad("bad.no_messages", "/v1/chat/completions", {"model": NAME}),
    _bad(
        "bad.negative_max_tokens", "/v1/chat/completions", {"model": NAME, "messages": USER, "max_tokens": -1}
    ),
    _bad(
        "bad.temperature_type",
        "/v1/chat/completions",
        {"model": NAME, "messages": USER, "temperature": "hot"},
    ),
    _bad(
        "bad.top_logprobs_50",
        "/v1/chat/completions",
        {"model": NAME, "messages": USER, "logprobs": True, "top_logprobs": 50},
    ),
    _bad("bad.too_long", "/v1/completions", {"model": NAME, "prompt": "the cat", "max_tokens": 5000}),
    _bad("bad.json", "/v1/chat/completions", raw=b'{"model": "tiny", "messages": ['),
    _bad("bad.comp_no_prompt", "/v1/completions", {"model": NAME, "max_tokens": 3}),
    _bad(
        "bad.resp_unknown_previous",
        "/v1/responses",
        {"model": NAME, "input": "x", "previous_response_id": "resp_nope"},
    ),
    _bad("bad.msg_no_max_tokens", "/v1/messages", {"model": NAME, "messages": USER}),
    _bad("bad.msg_unknown_model", "/v1/messages", {"model": "nope", "max_tokens": 5, "messages": USER}),
]
