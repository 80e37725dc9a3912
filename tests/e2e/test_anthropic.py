"""Anthropic's Messages API of `dynvllm serve agg` through the real `anthropic` client: the same
prompt as OpenAI's chat (so the same greedy text), its stop reasons, events, usage and errors."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

MESSAGES = [{"role": "user", "content": "the quick bird finds a tree"}]
SYSTEM = "you are a router"
# Newer SDKs dropped sampling arguments from create(); the API and older clients still send them.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def clients(agg_service):
    url, _ = agg_service
    return (
        anthropic.Anthropic(base_url=url, api_key="none", max_retries=0),
        openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0),
    )


def _chat(oai: openai.OpenAI, messages: list, **kw) -> openai.types.chat.ChatCompletion:
    return oai.chat.completions.create(model="tiny", messages=messages, temperature=0, **kw)


def test_a_message_is_the_chat_answer_with_anthropics_shape(clients):
    ant, oai = clients
    want = _chat(oai, [{"role": "system", "content": SYSTEM}, *MESSAGES], max_tokens=12)
    got = ant.messages.create(
        model="tiny", system=SYSTEM, messages=MESSAGES, max_tokens=12, extra_body=GREEDY
    )
    assert got.type == "message" and got.role == "assistant" and got.model == "tiny"
    assert [b.type for b in got.content] == ["text"]
    assert got.content[0].text == want.choices[0].message.content
    assert got.usage.input_tokens == want.usage.prompt_tokens
    assert got.usage.output_tokens == want.usage.completion_tokens
    want_reason = {"length": "max_tokens", "stop": "end_turn"}[want.choices[0].finish_reason]
    assert got.stop_reason == want_reason


def test_streamed_events_carry_the_same_text_and_the_stop_reason(clients):
    ant, _ = clients
    whole = ant.messages.create(model="tiny", messages=MESSAGES, max_tokens=16, extra_body=GREEDY)
    with ant.messages.stream(model="tiny", messages=MESSAGES, max_tokens=16, extra_body=GREEDY) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_start" in kinds and "message_delta" in kinds
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_stop_sequences_and_max_tokens_map_to_their_stop_reasons(clients):
    ant, _ = clients
    long = ant.messages.create(model="tiny", messages=MESSAGES, max_tokens=3, extra_body=GREEDY)
    assert long.stop_reason == "max_tokens" and long.usage.output_tokens == 3
    text = (
        ant.messages.create(model="tiny", messages=MESSAGES, max_tokens=24, extra_body=GREEDY).content[0].text
    )
    stop = next(ch for ch in text[2:] if ch.strip())  # a character the greedy answer does produce
    cut = ant.messages.create(
        model="tiny", messages=MESSAGES, max_tokens=24, extra_body=GREEDY, stop_sequences=[stop]
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]


def test_count_tokens_matches_the_prompt_the_chat_uses(clients):
    ant, oai = clients
    counted = ant.messages.count_tokens(model="tiny", system=SYSTEM, messages=MESSAGES)
    chat = _chat(oai, [{"role": "system", "content": SYSTEM}, *MESSAGES], max_tokens=1)
    assert counted.input_tokens == chat.usage.prompt_tokens


def test_errors_come_in_anthropics_shape_and_name_the_cause(clients, agg_service):
    ant, _ = clients
    with pytest.raises(anthropic.NotFoundError) as e:
        ant.messages.create(model="nope", messages=MESSAGES, max_tokens=4)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    assert "nope" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        ant.messages.create(
            model="tiny", messages=MESSAGES, max_tokens=4, thinking={"type": "enabled", "budget_tokens": 1024}
        )
    assert "thinking" in e.value.body["error"]["message"]
    url, _ = agg_service
    r = httpx.post(
        url + "/v1/messages", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "frobnicate": 1}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "frobnicate" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/messages", json={"model": "tiny", "messages": MESSAGES})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    # The service kept serving.
    assert ant.messages.create(model="tiny", messages=MESSAGES, max_tokens=2).usage.output_tokens == 2
