"""OpenAI's Responses API of `dynvllm serve agg` through the real `openai` client: the same prompt
as chat (so the same greedy text), streamed events, stored responses and their conversations,
forced function calls, structured output and errors in OpenAI's shape."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import httpx
import jsonschema
import openai
import pytest

SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
    "required": ["color", "ok"],
    "additionalProperties": False,
}
WEATHER = {
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"unit": {"enum": ["c", "f"]}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["unit", "days"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def client(agg_service):
    url, _ = agg_service
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def _chat(client: openai.OpenAI, messages: list, **kw):
    return client.chat.completions.create(model="tiny", messages=messages, temperature=0, **kw)


def _respond(client: openai.OpenAI, **kw):
    return client.responses.create(model="tiny", temperature=0, **kw)


def test_a_response_is_the_chat_answer_with_the_responses_shape(client):
    want = _chat(
        client,
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a red fox"}],
        max_tokens=12,
    )
    got = _respond(client, instructions="be brief", input="a red fox", max_output_tokens=12, store=False)
    assert got.object == "response" and got.model == "tiny" and got.id.startswith("resp_")
    assert [i.type for i in got.output] == ["message"]
    assert got.output_text == want.choices[0].message.content
    assert got.usage.input_tokens == want.usage.prompt_tokens
    assert got.usage.output_tokens == want.usage.completion_tokens
    assert got.usage.total_tokens == want.usage.total_tokens
    finish = want.choices[0].finish_reason
    assert got.status == {"length": "incomplete", "stop": "completed"}[finish]
    if finish == "length":
        assert got.incomplete_details.reason == "max_output_tokens"
    assert got.instructions == "be brief" and got.max_output_tokens == 12 and got.temperature == 0


def test_streamed_events_carry_the_same_text_in_openais_order(client):
    whole = _respond(client, input="the old river", max_output_tokens=10, store=False)
    events = list(_respond(client, input="the old river", max_output_tokens=10, store=False, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed" if whole.status == "completed" else "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    assert next(e for e in events if e.type == "response.output_text.done").text == text
    final = events[-1].response
    assert final.output_text == text and final.status == whole.status
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id


def test_previous_response_id_continues_the_stored_conversation(client):
    first = _respond(client, input="seven blue birds", instructions="one", max_output_tokens=8)
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = _respond(client, input="why is it red", previous_response_id=first.id, max_output_tokens=8)
    # Instructions do not carry over to the next turn, as at OpenAI.
    conversation = [
        {"role": "user", "content": "seven blue birds"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "why is it red"},
    ]
    want = _chat(client, conversation, max_tokens=8)
    assert second.previous_response_id == first.id
    assert second.output_text == want.choices[0].message.content
    assert second.usage.input_tokens == want.usage.prompt_tokens > first.usage.input_tokens
    streamed = list(
        _respond(
            client, input="why is it red", previous_response_id=first.id, max_output_tokens=8, stream=True
        )
    )
    assert streamed[-1].response.output_text == second.output_text
    third = _respond(client, input="where", previous_response_id=second.id, max_output_tokens=4)
    want = _chat(
        client,
        [
            *conversation,
            {"role": "assistant", "content": second.output_text},
            {"role": "user", "content": "where"},
        ],
        max_tokens=4,
    )
    assert third.output_text == want.choices[0].message.content
    assert third.usage.input_tokens == want.usage.prompt_tokens > second.usage.input_tokens


def test_stored_responses_are_retrieved_and_deleted(client, agg_service):
    url, _ = agg_service
    r = _respond(client, input="pick a color", max_output_tokens=4)
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.usage == r.usage
    client.responses.delete(r.id)
    for call in (lambda: client.responses.retrieve(r.id), lambda: client.responses.delete(r.id)):
        with pytest.raises(openai.NotFoundError) as exc:
            call()
        assert exc.value.body["param"] == "response_id" and r.id in exc.value.body["message"]
    with pytest.raises(openai.NotFoundError) as exc:
        _respond(client, input="more", previous_response_id=r.id)
    assert exc.value.body["param"] == "previous_response_id"
    unstored = _respond(client, input="pick a color", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    raw = httpx.get(f"{url}/v1/responses/{unstored.id}")
    assert raw.status_code == 404 and set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_a_forced_function_call_is_an_output_item_and_its_result_continues(client):
    tools = [{"type": "function", **WEATHER}]
    choice = {"type": "function", "name": "get_weather"}
    r = _respond(client, input="weather?", tools=tools, tool_choice=choice, max_output_tokens=40)
    call = r.output[-1]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    chat = _chat(
        client,
        [{"role": "user", "content": "weather?"}],
        tools=[{"type": "function", "function": WEATHER}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
    )
    assert call.arguments == chat.choices[0].message.tool_calls[0].function.arguments
    events = list(
        _respond(client, input="weather?", tools=tools, tool_choice=choice, max_output_tokens=40, stream=True)
    )
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == call.arguments and done.name == "get_weather"
    # The call's output, sent as the next turn's input, reaches the prompt as a tool message.
    follow = _respond(
        client,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        previous_response_id=r.id,
        tools=tools,
        tool_choice="none",
        max_output_tokens=8,
    )
    want = _chat(
        client,
        [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"},
        ],
        tools=[{"type": "function", "function": WEATHER}],
        tool_choice="none",
        max_tokens=8,
    )
    assert follow.output_text == want.choices[0].message.content
    assert follow.usage.input_tokens == want.usage.prompt_tokens


def test_included_logprobs_are_the_chat_answers_logprobs(client):
    include = ["message.output_text.logprobs"]
    r = _respond(client, input="the cat sees", max_output_tokens=6, include=include, top_logprobs=2)
    c = _chat(
        client, [{"role": "user", "content": "the cat sees"}], max_tokens=6, logprobs=True, top_logprobs=2
    )
    got, want = r.output[0].content[0].logprobs, c.choices[0].logprobs.content
    assert r.output[0].content[0].text == c.choices[0].message.content
    assert [x.token for x in got] == [x.token for x in want] and len(got) == r.usage.output_tokens > 0
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got, want, strict=True)) < 1e-4
    assert all(len(x.top_logprobs) == 2 for x in got) and r.top_logprobs == 2
    # Streamed: the deltas carry the same entries, in order.
    with client.responses.stream(
        model="tiny",
        input="the cat sees",
        max_output_tokens=6,
        temperature=0,
        include=include,
        top_logprobs=2,
    ) as stream:
        streamed = [x.token for e in stream if e.type == "response.output_text.delta" for x in e.logprobs]
    assert streamed == [x.token for x in want]


def test_json_schema_text_format_is_structured_output(client):
    fmt = {"type": "json_schema", "name": "pick", "schema": SCHEMA, "strict": True}
    r = _respond(client, input="pick a color", text={"format": fmt}, max_output_tokens=40, store=False)
    jsonschema.validate(json.loads(r.output_text), SCHEMA)
    want = _chat(
        client,
        [{"role": "user", "content": "pick a color"}],
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA}},
        max_tokens=40,
    )
    assert r.output_text == want.choices[0].message.content
    assert r.text.format.type == "json_schema"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"background": True, "store": False}, "background"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"reasoning": {"summary": "auto"}}, "reasoning"),
        ({"truncation": "auto"}, "truncation"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
        ({"max_output_tokens": 100000}, "max_output_tokens"),
    ],
)
def test_errors_are_400s_in_openais_shape_naming_the_field(client, extra, param):
    kw = {"input": "hi", **extra}
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="tiny", **kw)
    body = exc.value.body
    assert body["param"] == param and body["type"] == "invalid_request_error", body


def _polled(client: openai.OpenAI, rid: str, timeout: float = 60):
    """The response once it is no longer queued or in progress, and the statuses seen before."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        got = client.responses.retrieve(rid)
        if got.status not in ("queued", "in_progress"):
            return got, seen
        seen.append(got.status)
        assert time.monotonic() < deadline, seen
        time.sleep(0.05)


def test_a_background_response_is_polled_to_the_same_answer(client):
    want = _respond(client, input="the red mountain", max_output_tokens=12, store=False)
    r = _respond(client, input="the red mountain", max_output_tokens=12, background=True)
    assert r.background and r.status in ("queued", "in_progress") and r.output == []
    got, seen = _polled(client, r.id)
    assert set(seen) <= {"queued", "in_progress"}
    assert got.id == r.id and got.background and got.status == want.status
    assert got.output_text == want.output_text and got.usage.output_tokens == want.usage.output_tokens
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.cancel(r.id)  # finished already
    assert exc.value.body["param"] == "response_id"
    # A finished background response continues a conversation as any stored one.
    more = _respond(client, input="why", previous_response_id=r.id, max_output_tokens=4)
    assert more.usage.input_tokens > got.usage.input_tokens

    # Streamed: the creating request reads the events as they come; GET ?stream=true reads them
    # again from any sequence number.
    events = list(
        _respond(client, input="the red mountain", max_output_tokens=12, background=True, stream=True)
    )
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert kinds[-1] == ("response.completed" if want.status == "completed" else "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "queued" and events[-1].response.output_text == want.output_text
    rid = events[0].response.id
    again = list(client.responses.retrieve(rid, stream=True, starting_after=2))
    assert [e.model_dump() for e in again] == [e.model_dump() for e in events[3:]]
    assert client.responses.retrieve(rid).output_text == want.output_text


def _engine_metrics() -> list[str]:
    """The metrics address of each worker of the shared service."""
    out = subprocess.run(
        [sys.executable, "-m", "dynvllm", "status", "--json", "--namespace", "e2e"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [i["metrics"] for i in json.loads(out.stdout)["instances"] if i["component"] == "worker"]


def _running(addresses: list[str]) -> float:
    """Requests vLLM's engines run now (their own gauge), over every worker."""
    texts = [httpx.get(f"http://{a}/metrics", timeout=10).text for a in addresses]
    return sum(
        float(m) for t in texts for m in re.findall(r"^vllm:num_requests_running\{\S* (\S+)$", t, re.M)
    )


def test_cancelling_a_background_response_aborts_its_engine_request(client):
    engines = _engine_metrics()
    tokens = 4000  # far more than the engine makes before the cancel reaches it
    r = _respond(
        client, input="go on", max_output_tokens=tokens, background=True, extra_body={"ignore_eos": True}
    )
    deadline = time.monotonic() + 60
    while client.responses.retrieve(r.id).status == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    time.sleep(0.5)
    assert _running(engines) >= 1
    cancelled = client.responses.cancel(r.id)
    stopped = time.monotonic()
    assert cancelled.id == r.id and cancelled.status == "cancelled"
    made = cancelled.usage.output_tokens
    # The engines run nothing any more within a few seconds, while going on at the rate seen so
    # far would have taken much longer: the request was aborted.
    while _running(engines) > 0:
        assert time.monotonic() - stopped < 5
        time.sleep(0.1)
    assert made + made / (stopped - started) * 5 < tokens, made
    assert client.responses.retrieve(r.id).status == "cancelled"
    assert client.responses.cancel(r.id).status == "cancelled"  # again: nothing left to stop
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.cancel(_respond(client, input="hi", max_output_tokens=2).id)
    assert exc.value.body["message"] == "Cannot cancel a synchronous response."


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.responses.create(model="nope", input="hi")
    assert exc.value.body["code"] == "model_not_found"
