"""vLLM's chat request fields that shape the prompt (continue_final_message, chat_template,
reasoning_effort) and the response (return_token_ids, finish_reason of forced tool calls), with a
real tokenizer and no server."""

from __future__ import annotations

import pytest

from dynvllm.frontend.errors import RequestError
from dynvllm.frontend.models import ModelEntry
from dynvllm.frontend.openai import schema as oa
from dynvllm.frontend.openai.completion_format import CompletionFormatter
from dynvllm.frontend.openai.formatters import ChatFormatter
from dynvllm.frontend.postprocess import ChoiceDelta
from dynvllm.frontend.request_path import Part
from dynvllm.frontend.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "user", "content": "finish my sentence"},
    {"role": "assistant", "content": "The old river "},
]
EFFORT_TEMPLATE = "{{ messages[-1]['content'] }}|{{ reasoning_effort }}|{{ enable_thinking }}"


@pytest.fixture(scope="module")
def tok(tiny_model) -> Tokenizer:
    return Tokenizer(tiny_model)


@pytest.fixture(scope="module")
def entry(tok) -> ModelEntry:
    return ModelEntry("tiny", {}, tokenizer=tok)


def _chat(**kw) -> oa.ChatRequest:
    return oa.validate(oa.ChatRequest, {"model": "tiny", "messages": CONVERSATION, **kw})


def _text(fmt: ChatFormatter, entry: ModelEntry, req: oa.ChatRequest) -> str:
    assert entry.tokenizer is not None
    return entry.tokenizer.decode(fmt.prompts(entry, req)[0][0], skip_special_tokens=False)


def test_continue_final_message_ends_the_prompt_inside_the_last_message_as_transformers_does(tiny_model, tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model)
    for messages in (CONVERSATION, [*CONVERSATION[:1], {"role": "assistant", "content": "no space"}]):
        want = hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False, continue_final_message=True
        )
        got = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
        assert got == want
        assert got.endswith("<|im_start|>assistant\n" + messages[-1]["content"])


def test_continue_final_message_through_the_chat_request(entry):
    fmt = ChatFormatter()
    text = _text(fmt, entry, _chat(continue_final_message=True, add_generation_prompt=False))
    assert text.endswith("<|im_start|>assistant\nThe old river ")
    plain = _text(fmt, entry, _chat())
    assert plain.endswith("<|im_start|>assistant\n") and "The old river <|im_end|>" in plain
    with pytest.raises(RequestError) as exc:  # add_generation_prompt is true unless sent false
        _chat(continue_final_message=True)
    assert "add_generation_prompt" in exc.value.message


def test_a_request_template_needs_the_servers_trust(entry):
    req = _chat(chat_template="{% for m in messages %}[{{ m['role'] }}]{% endfor %}")
    with pytest.raises(RequestError) as exc:
        ChatFormatter().prompts(entry, req)
    assert exc.value.status == 400 and exc.value.param == "chat_template"
    assert "--trust-request-chat-template" in exc.value.message
    assert _text(ChatFormatter(trust_request_chat_template=True), entry, req) == "[user][assistant]"


def test_the_servers_template_replaces_the_models(entry):
    fmt = ChatFormatter(chat_template="{{ messages | length }} messages")
    assert _text(fmt, entry, _chat()) == "2 messages"
    trusted = ChatFormatter(chat_template="server", trust_request_chat_template=True)
    assert _text(trusted, entry, _chat(chat_template="request")) == "request"  # the request's wins


def test_a_broken_template_is_a_400(entry):
    fmt = ChatFormatter(trust_request_chat_template=True)
    with pytest.raises(RequestError) as exc:
        fmt.prompts(entry, _chat(chat_template="{% for %}"))
    assert exc.value.status == 400 and "chat template" in exc.value.message


def test_reasoning_effort_reaches_the_template_with_enable_thinking(entry):
    fmt = ChatFormatter(chat_template=EFFORT_TEMPLATE)
    assert _text(fmt, entry, _chat(reasoning_effort="low")) == "The old river |low|True"
    assert _text(fmt, entry, _chat(reasoning_effort="none")) == "The old river |none|False"
    # The client's own enable_thinking stays; without an effort neither variable is set.
    kept = _chat(reasoning_effort="high", chat_template_kwargs={"enable_thinking": False})
    assert _text(fmt, entry, kept) == "The old river |high|False"
    assert _text(fmt, entry, _chat()) == "The old river ||"
    with pytest.raises(RequestError) as exc:
        _chat(reasoning_effort="extreme")
    assert exc.value.param == "reasoning_effort"


def test_chat_template_inside_chat_template_kwargs_is_refused(entry):
    req = _chat(chat_template_kwargs={"chat_template": "x"})
    with pytest.raises(RequestError) as exc:
        ChatFormatter(trust_request_chat_template=True).prompts(entry, req)
    assert exc.value.param == "chat_template_kwargs"


# ---- response shapes -------------------------------------------------------------------------


def _part(ids: list[int]) -> Part:
    return Part(ids, None, None)


def test_chat_returns_token_ids_as_vllm_does():
    req = _chat(return_token_ids=True)
    parts = [_part([5, 6, 7])]
    shaper = ChatFormatter().shaper(req, parts, 1)
    assert shaper.top() == {"prompt_token_ids": [5, 6, 7]}
    first = shaper.chunk(0, parts[0], ChoiceDelta(0, "ab", [11, 12]))
    held = shaper.chunk(0, parts[0], ChoiceDelta(0, "", [13]))  # no text yet: the ids still go
    last = shaper.chunk(0, parts[0], ChoiceDelta(0, "c", [14], finish_reason="stop"))
    assert [c["token_ids"] for c in first + held + last] == [[11, 12], [13], [14]]
    choice = shaper.choices()[0]
    assert choice["token_ids"] == [11, 12, 13, 14] and choice["message"]["content"] == "abc"
    plain = ChatFormatter().shaper(_chat(), parts, 1)
    assert plain.top() == {} and "token_ids" not in plain.chunk(0, parts[0], ChoiceDelta(0, "a", [1]))[0]
    assert "token_ids" not in plain.choices()[0]


def test_completions_return_prompt_and_output_token_ids_per_choice():
    req = oa.validate(oa.CompletionRequest, {"model": "tiny", "prompt": ["a", "b"], "return_token_ids": True})
    parts = [_part([1, 2]), _part([3])]
    shaper = CompletionFormatter().shaper(req, parts, 1)
    c0 = shaper.chunk(0, parts[0], ChoiceDelta(0, "x", [9]))[0]
    c0b = shaper.chunk(0, parts[0], ChoiceDelta(0, "y", [8], finish_reason="length"))[0]
    c1 = shaper.chunk(1, parts[1], ChoiceDelta(0, "z", [7], finish_reason="stop"))[0]
    assert (c0["prompt_token_ids"], c0["token_ids"]) == ([1, 2], [9])
    assert "prompt_token_ids" not in c0b and c0b["token_ids"] == [8]
    assert (c1["prompt_token_ids"], c1["token_ids"]) == ([3], [7])
    choices = shaper.choices()
    assert [(c["prompt_token_ids"], c["token_ids"]) for c in choices] == [([1, 2], [9, 8]), ([3], [7])]


TOOL = {"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("choice", "args", "finish"),
    [
        ({"type": "function", "function": {"name": "get"}}, '{"a": 1}', "stop"),
        ("required", '[{"name": "get", "parameters": {"a": 1}}]', "tool_calls"),
    ],
)
def test_a_named_call_finishes_with_stop_and_a_required_one_with_tool_calls(choice, args, finish):
    req = _chat(tools=[TOOL], tool_choice=choice)
    parts = [_part([1])]
    shaper = ChatFormatter().shaper(req, parts, 1)
    chunks = shaper.chunk(0, parts[0], ChoiceDelta(0, args, [2], finish_reason="stop"))
    assert chunks[-1]["finish_reason"] == finish
    assert any(c["delta"].get("tool_calls") for c in chunks)
    whole = shaper.choices()[0]
    assert whole["finish_reason"] == finish and whole["message"]["tool_calls"][0]["function"]["name"] == "get"
