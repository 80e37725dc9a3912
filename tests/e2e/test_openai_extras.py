"""Agents and evaluation through the real `openai` client against `serve agg` on real vLLM:
structured outputs, tools, reasoning, batched and echo completions, logit bias, the extra
endpoints, the field rule and API keys. Greedy outputs are compared with vLLM offline.

The workers are the shared service's (its engines keep structured JSON compact); the tool and
reasoning parsers and the API keys are a frontend's, so these tests run a frontend of their own."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from dynvllm.runtime import state
from tests.helpers import start_service, wait_workers, want_reference

KEY = "sk-test-2"
SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
    "required": ["color", "ok"],
    "additionalProperties": False,
}
QUESTIONS = [
    "pick a color",
    "the cat sees a dog",
    "where is the old river",
    "why is it red",
    "seven blue birds",
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 9},
            },
            "required": ["unit", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
PROMPTS = ["the cat sees a dog and", "red river runs where the old mountain", "why is the model slow?"]


@pytest.fixture(scope="module")
def service(agg_service, tmp_path_factory):
    fe = start_service(
        ["frontend"],
        tmp_path_factory.mktemp("extras") / "frontend.log",
        "--tool-call-parser",
        "hermes",
        "--reasoning-parser",
        "qwen3",
        "--trust-request-chat-template",
        namespace="e2e",
        nats_url=state.resolve_nats_url(None, "e2e"),
        env={"DYN_API_KEY": f"sk-test-1,{KEY}"},
    )
    try:
        wait_workers(fe, 2, timeout=120)
        yield fe.url
    finally:
        fe.stop()


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=service + "/v1", api_key=KEY, max_retries=0)


_GREEDY = {"max_tokens": 96, "temperature": 0}
REFERENCE = want_reference(
    "extras",
    [
        {
            "kind": "chat",
            "input": [{"role": "user", "content": q}],
            "params": {**_GREEDY, "structured_outputs": {"json": SCHEMA}},
        }
        for q in QUESTIONS
    ]
    + [{"kind": "completion", "input": p, "params": {"max_tokens": 12, "temperature": 0}} for p in PROMPTS]
    + [
        {
            "kind": "completion",
            "input": PROMPTS[1],
            "params": {"max_tokens": 1, "temperature": 0, "prompt_logprobs": 2},
        }
    ],
)


@pytest.fixture(scope="module")
def reference(references):
    return references[REFERENCE]


def _chat(client, content: str, **kw):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], temperature=0, **kw
    )


def _stream_text(stream) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish


def test_json_schema_outputs_validate_and_equal_vllm_offline(client, reference):
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}}
    for q, expected in zip(QUESTIONS, reference[:5], strict=True):
        r = _chat(client, q, max_tokens=96, response_format=fmt)
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
        assert text == expected[0]
        streamed, finish = _stream_text(_chat(client, q, max_tokens=96, response_format=fmt, stream=True))
        assert streamed == text and finish == "stop"


def test_structured_outputs_extension_choice_and_regex(client):
    r = client.completions.create(
        model="tiny",
        prompt="the answer is",
        max_tokens=8,
        temperature=0,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert r.choices[0].text in ("yes", "no")
    r = client.completions.create(
        model="tiny",
        prompt="a code:",
        max_tokens=12,
        temperature=0,
        extra_body={"structured_outputs": {"regex": "[a-c]{3}-[0-9]{2}"}},
    )
    assert len(r.choices[0].text) == 6 and r.choices[0].text[3] == "-"


def test_invalid_schema_and_double_constraints_are_400(client):
    with pytest.raises(openai.BadRequestError, match="not a valid JSON schema"):
        _chat(
            client,
            "x",
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": 5}}},
        )
    with pytest.raises(openai.BadRequestError, match="disable_any_whitespace"):
        _chat(client, "x", extra_body={"structured_outputs": {"regex": "a+", "disable_any_whitespace": True}})
    with pytest.raises(openai.BadRequestError, match="constrains its output twice"):
        _chat(
            client,
            "x",
            response_format={"type": "json_object"},
            extra_body={"structured_outputs": {"regex": "a+"}},
        )


def _validate_call(call, tools) -> None:
    schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)
    assert call.id.startswith("call_") and call.type == "function"


def _streamed_calls(stream) -> tuple[list[tuple[str, str]], str | None]:
    """Accumulate tool-call deltas as OpenAI's client code does (by index)."""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
    return [(c["name"], c["arguments"]) for _, c in sorted(calls.items())], finish


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_time"}}],
    ids=["required", "named"],
)
def test_forced_tool_calls_validate_and_stream_the_same(client, tool_choice):
    tools = [WEATHER, TIME]
    # One call at most: a random model would otherwise append calls until max_tokens.
    kw = {"tools": tools, "tool_choice": tool_choice, "parallel_tool_calls": False}
    # As OpenAI and vLLM answer: a named function's call finishes with "stop".
    want_finish = "stop" if isinstance(tool_choice, dict) else "tool_calls"
    for q in QUESTIONS[:3]:
        r = _chat(client, q, max_tokens=96, **kw)
        choice = r.choices[0]
        assert choice.finish_reason == want_finish and choice.message.tool_calls, choice.message.content
        for call in choice.message.tool_calls:
            _validate_call(call, tools)
        if isinstance(tool_choice, dict):
            assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
        streamed, finish = _streamed_calls(_chat(client, q, max_tokens=96, stream=True, **kw))
        assert streamed == [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
        assert finish == want_finish


def test_tool_history_reaches_the_chat_template(service):
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny and 21 degrees"},
    ]
    body = {"model": "tiny", "messages": messages}
    r = httpx.post(service + "/tokenize", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    d = httpx.post(
        service + "/detokenize",
        json={"model": "tiny", "tokens": r.json()["tokens"]},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert "sunny and 21 degrees" in d.json()["prompt"]


def test_reasoning_is_split_from_content(client):
    # Structured outputs make the random model emit a think block; the qwen3 parser splits it.
    regex = "<think>[a-z]{3,6}</think>[a-z]{2,5}"
    r = _chat(client, "think first", max_tokens=40, extra_body={"structured_outputs": {"regex": regex}})
    msg = r.choices[0].message
    reasoning = msg.model_extra["reasoning_content"]
    assert 3 <= len(reasoning) <= 6 and reasoning.isalpha() and 2 <= len(msg.content) <= 5
    stream = _chat(
        client, "think first", max_tokens=40, stream=True, extra_body={"structured_outputs": {"regex": regex}}
    )
    got_r, got_c = "", ""
    for chunk in stream:
        for c in chunk.choices:
            got_r += (c.delta.model_extra or {}).get("reasoning_content") or ""
            got_c += c.delta.content or ""
    assert (got_r, got_c) == (reasoning, msg.content)


def test_auto_tool_choice_uses_the_parser(client):
    r = _chat(client, "hello", max_tokens=8, tools=[WEATHER])
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.tool_calls is None


def test_batched_completions_equal_one_request_per_prompt(client, reference):
    batch = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == [ref[0] for ref in reference[5:8]]
    singles = [
        client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0) for p in PROMPTS
    ]
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in singles]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    n2 = client.completions.create(
        model="tiny", prompt=PROMPTS[:2], max_tokens=4, n=2, temperature=1.0, seed=1
    )
    assert [c.index for c in n2.choices] == [0, 1, 2, 3]  # prompt-major, as vLLM numbers them
    stream = client.completions.create(
        model="tiny", prompt=PROMPTS, max_tokens=12, temperature=0, stream=True
    )
    texts = ["", "", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in batch.choices]


def test_echo_with_logprobs_equals_vllm_prompt_logprobs(client, reference):
    ref = reference[8]
    r = client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    c = r.choices[0]
    assert c.text == PROMPTS[1]
    n = len(ref["prompt_token_ids"])
    got = c.logprobs.token_logprobs[:n]
    assert got[0] is None and ref["prompt_logprobs"][0] is None
    assert all(abs(a - b) < 1e-3 for a, b in zip(got[1:], ref["prompt_logprobs"][1:], strict=True))
    assert "".join(c.logprobs.tokens) == PROMPTS[1] and c.logprobs.text_offset[0] == 0
    r = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=3, echo=True, temperature=0)
    assert r.choices[0].text.startswith(PROMPTS[1]) and len(r.choices[0].text) > len(PROMPTS[1])


def test_prompt_logprobs_and_stop_reason(client):
    r = client.completions.create(
        model="tiny",
        prompt=PROMPTS[0],
        max_tokens=24,
        temperature=0,
        stop=["e"],
        extra_body={"prompt_logprobs": 1},
    )
    c = r.choices[0]
    assert c.model_extra["stop_reason"] == "e" and c.finish_reason == "stop"
    plp = c.model_extra["prompt_logprobs"]
    assert plp[0] is None and all(isinstance(p, dict) and p for p in plp[1:])


def test_logit_bias_is_applied(service, client):
    h = {"Authorization": f"Bearer {KEY}"}
    ids = httpx.post(
        service + "/tokenize",
        json={"model": "tiny", "prompt": " cat", "add_special_tokens": False},
        headers=h,
    ).json()["tokens"]
    target = ids[-1]
    base = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=4, temperature=0)
    biased = client.completions.create(
        model="tiny", prompt=PROMPTS[2], max_tokens=4, temperature=0, logit_bias={str(target): 100}
    )
    forced = httpx.post(service + "/detokenize", json={"model": "tiny", "tokens": [target] * 4}, headers=h)
    assert biased.choices[0].text == forced.json()["prompt"] != base.choices[0].text
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, logit_bias={"999999": 5})


def test_engine_validation_errors_are_400(client):
    with pytest.raises(openai.BadRequestError, match="greedy"):
        client.completions.create(model="tiny", prompt="x", max_tokens=2, n=2, temperature=0)


@pytest.mark.parametrize(
    "extra,name",
    [
        ({"use_beam_search": True}, "use_beam_search"),
        ({"suffix": "end"}, "suffix"),
        ({"truncate_prompt_tokens": 3}, "truncate_prompt_tokens"),
    ],
)
def test_known_unsupported_fields_are_refused_by_name(client, extra, name):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body=extra)
    assert name in info.value.message and info.value.body["param"] == name


def test_unknown_fields_are_ignored(client):
    r = client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"no_such_field_xyz": 1})
    assert r.choices[0].finish_reason == "length"


def test_api_key(service):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    assert httpx.post(service + "/v1/completions", json=body).status_code == 401
    bad = httpx.post(service + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    for key in ("sk-test-1", KEY):
        ok = httpx.post(service + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
    assert httpx.get(service + "/v1/models").status_code == 401
    for open_path in ("/health", "/live", "/metrics", "/version"):
        assert httpx.get(service + open_path).status_code == 200


def test_extra_endpoints(service, client):
    h = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(service + "/version").json()["version"]
    m = client.models.retrieve("tiny")
    assert m.id == "tiny" and m.model_extra["root"] and m.model_extra["parent"] is None
    assert httpx.get(service + "/v1/models/nope", headers=h).status_code == 404
    t = httpx.post(service + "/tokenize", json={"model": "tiny", "prompt": "red river"}, headers=h).json()
    assert t["count"] == len(t["tokens"]) and t["max_model_len"] > 0
    d = httpx.post(service + "/detokenize", json={"model": "tiny", "tokens": t["tokens"]}, headers=h).json()
    assert d["prompt"].endswith("red river")
    bad = httpx.post(service + "/detokenize", json={"model": "tiny", "tokens": [10**9]}, headers=h)
    assert bad.status_code == 400 and "out of range" in bad.json()["error"]["message"]


def _tokenize(service: str, **body) -> list[int]:
    r = httpx.post(
        service + "/tokenize", json={"model": "tiny", **body}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_return_token_ids_gives_the_prompts_and_the_outputs_ids(service, client):
    messages = [{"role": "user", "content": QUESTIONS[1]}]
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, extra_body={"return_token_ids": True}
    )
    prompt_ids = r.model_extra["prompt_token_ids"]
    assert prompt_ids == _tokenize(service, messages=messages) and len(prompt_ids) == r.usage.prompt_tokens
    ids = r.choices[0].model_extra["token_ids"]
    assert len(ids) == r.usage.completion_tokens
    h = {"Authorization": f"Bearer {KEY}"}
    text = httpx.post(service + "/detokenize", json={"model": "tiny", "tokens": ids}, headers=h).json()[
        "prompt"
    ]
    # The whole decode may end in a replacement character where the stream held an unfinished one back.
    assert text.startswith(r.choices[0].message.content)
    same = client.completions.create(
        model="tiny", prompt=prompt_ids, max_tokens=10, temperature=0, extra_body={"return_token_ids": True}
    )
    assert same.choices[0].model_extra["token_ids"] == ids  # greedy: the same tokens from the same prompt
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            extra_body={"return_token_ids": True},
        )
    )
    assert chunks[0].model_extra["prompt_token_ids"] == prompt_ids
    assert all("prompt_token_ids" not in c.model_extra for c in chunks[1:])
    assert [t for c in chunks for ch in c.choices for t in (ch.model_extra.get("token_ids") or [])] == ids
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    assert "prompt_token_ids" not in plain.model_extra and "token_ids" not in plain.choices[0].model_extra
    done = client.completions.create(
        model="tiny", prompt=PROMPTS[:2], max_tokens=4, temperature=0, extra_body={"return_token_ids": True}
    )
    for choice, prompt in zip(done.choices, PROMPTS[:2], strict=True):
        assert choice.model_extra["prompt_token_ids"] == _tokenize(service, prompt=prompt)
        assert len(choice.model_extra["token_ids"]) == 4


def test_continue_final_message_continues_the_assistants_text(service, client):
    messages = [{"role": "user", "content": QUESTIONS[2]}, {"role": "assistant", "content": "The old river"}]
    fields = {"continue_final_message": True, "add_generation_prompt": False}
    ids = _tokenize(service, messages=messages, **fields)
    h = {"Authorization": f"Bearer {KEY}"}
    text = httpx.post(service + "/detokenize", json={"model": "tiny", "tokens": ids}, headers=h).json()
    assert text["prompt"].endswith("assistant\nThe old river")  # no end of turn after the assistant's text
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, extra_body=fields
    )
    want = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == want.choices[0].text
    with pytest.raises(openai.BadRequestError, match="add_generation_prompt"):
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=2, extra_body={"continue_final_message": True}
        )


def test_request_chat_template_and_reasoning_effort(service, client, agg_service):
    template = "effort={{ reasoning_effort }} {% for m in messages %}{{ m['content'] }}{% endfor %}:"
    messages = [{"role": "user", "content": QUESTIONS[3]}]
    fields = {"chat_template": template, "reasoning_effort": "low"}
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0, extra_body=fields
    )
    ids = _tokenize(service, prompt=f"effort=low {QUESTIONS[3]}:", add_special_tokens=False)
    want = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == want.choices[0].text and r.usage.prompt_tokens == len(ids)
    # The shared service's frontend does not trust request templates, as vLLM without the flag.
    url, _ = agg_service
    plain = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as exc:
        plain.chat.completions.create(model="tiny", messages=messages, max_tokens=2, extra_body=fields)
    assert exc.value.body["param"] == "chat_template"


def test_templates_render_as_transformers_does_over_http(service, client):
    """strftime_now and {% generation %} (which a private Jinja environment lacks) through a
    trusted request template; tools reach the template also under tool_choice none, as in vLLM."""
    import datetime

    template = (
        "{% generation %}{{ strftime_now('%Y') }}{% endgeneration %}|{{ messages[0]['content'] }}"
        "|{{ tools | map(attribute='function') | map(attribute='name') | join(',') if tools else '-' }}"
    )
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    fields = {"chat_template": template}
    ids = _tokenize(service, messages=messages, tools=[WEATHER, TIME], tool_choice="none", **fields)
    year = datetime.datetime.now().strftime("%Y")
    want = f"{year}|{QUESTIONS[0]}|get_weather,get_time"
    assert ids == _tokenize(service, prompt=want, add_special_tokens=False)
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, temperature=0, extra_body=fields
    )
    assert r.usage.prompt_tokens == len(_tokenize(service, messages=messages, **fields))


@pytest.fixture(scope="module")
def vllm_parsers_service(agg_service, tmp_path_factory):
    """A frontend that runs vLLM's own hermes parser (vllm:hermes) over the shared workers."""
    fe = start_service(
        ["frontend"],
        tmp_path_factory.mktemp("vllm_parsers") / "frontend.log",
        "--tool-call-parser",
        "vllm:hermes",
        namespace="e2e",
        nats_url=state.resolve_nats_url(None, "e2e"),
    )
    try:
        wait_workers(fe, 2, timeout=180)
        yield fe.url
    finally:
        fe.stop()


def test_vllms_own_tool_parser_reads_the_calls_over_http(vllm_parsers_service):
    """Structured outputs make the random model write a hermes call; vLLM's parser, run by the
    frontend, returns it as a tool call, streamed and not, finishing with tool_calls."""
    plain = openai.OpenAI(base_url=vllm_parsers_service + "/v1", api_key="none", max_retries=0)
    regex = r'<tool_call>\{"name": "get_time", "arguments": \{"zone": "(utc|cet)"\}\}</tool_call>'
    kw = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "time?"}],
        "tools": [WEATHER, TIME],
        "max_tokens": 200,
        "temperature": 0,
        "extra_body": {"structured_outputs": {"regex": regex}},
    }
    r = plain.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("utc", "cet")
    assert not choice.message.content
    streamed, finish = _streamed_calls(plain.chat.completions.create(stream=True, **kw))
    assert streamed == [(call.function.name, call.function.arguments)] and finish == "tool_calls"
