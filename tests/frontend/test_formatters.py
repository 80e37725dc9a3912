"""How client deltas become OpenAI choices, chunks and logprobs (the shapers of the chat and
completion formatters), without a server: plain text, reasoning, tool calls, several choices,
batched prompts, echo, logprobs and finish reasons."""

from __future__ import annotations

import json

import pytest

from dynvllm import registry
from dynvllm.frontend.openai import schema as oa
from dynvllm.frontend.openai.completion_format import CompletionFormatter
from dynvllm.frontend.openai.formatters import ChatFormatter, prompt_logprobs_json
from dynvllm.frontend.postprocess import ChoiceDelta, PostProcessor
from dynvllm.frontend.request_path import Part
from dynvllm.frontend.tokenizer import Tokenizer

USER = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def tok(tiny_model) -> Tokenizer:
    return Tokenizer(tiny_model)


def _chat(**kw) -> oa.ChatRequest:
    return oa.validate(oa.ChatRequest, {"model": "tiny", "messages": USER, **kw})


def _completion(**kw) -> oa.CompletionRequest:
    return oa.validate(oa.CompletionRequest, {"model": "tiny", "prompt": "x", **kw})


def _d(text: str = "", finish: str | None = None, index: int = 0, **kw) -> ChoiceDelta:
    return ChoiceDelta(index, text, kw.pop("token_ids", [1]), finish_reason=finish, **kw)


def _parser(group: str, name: str):
    return registry.load(group, name)()


# ---- chat ---------------------------------------------------------------------------------


def test_plain_chat_streams_content_and_finishes_on_the_last_chunk():
    part = Part([1, 2], None, None)
    shaper = ChatFormatter().shaper(_chat(n=2), [part], 2)
    assert shaper.opening() == [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        for i in (0, 1)
    ]
    assert shaper.chunk(0, part, _d("Hel")) == [
        {"index": 0, "delta": {"content": "Hel"}, "logprobs": None, "finish_reason": None}
    ]
    assert shaper.chunk(1, part, _d("Other", "length", index=1)) == [
        {
            "index": 1,
            "delta": {"content": "Other"},
            "logprobs": None,
            "finish_reason": "length",
            "stop_reason": None,
        }
    ]
    assert shaper.chunk(0, part, _d("", token_ids=[])) == []  # nothing to say: no chunk
    assert shaper.chunk(0, part, _d("lo", "stop"))[0]["finish_reason"] == "stop"
    assert [(c["index"], c["message"], c["logprobs"], c["finish_reason"]) for c in shaper.choices()] == [
        (0, {"role": "assistant", "content": "Hello"}, None, "stop"),
        (1, {"role": "assistant", "content": "Other"}, None, "length"),
    ]
    assert shaper.finish == ["stop", "length"]


def test_chat_logprobs_have_tokens_bytes_and_top_alternatives_only_when_asked():
    part = Part([1], None, None)
    entries = [["é", -0.5, [["é", -0.5], ["a", -1.25]]], ["b", -0.1, [["b", -0.1]]]]
    asked = ChatFormatter().shaper(_chat(logprobs=True, top_logprobs=2), [part], 1)
    chunk = asked.chunk(0, part, _d("éb", "stop", logprobs=entries))[0]
    first = {
        "token": "é",
        "logprob": -0.5,
        "bytes": [195, 169],
        "top_logprobs": [
            {"token": "é", "logprob": -0.5, "bytes": [195, 169]},
            {"token": "a", "logprob": -1.25, "bytes": [97]},
        ],
    }
    assert chunk["logprobs"]["content"][0] == first
    assert [e["token"] for e in chunk["logprobs"]["content"]] == ["é", "b"]
    assert asked.choices()[0]["logprobs"] == chunk["logprobs"]
    quiet = ChatFormatter().shaper(_chat(), [part], 1)
    assert quiet.chunk(0, part, _d("éb", "stop", logprobs=entries))[0]["logprobs"] is None
    assert quiet.choices()[0]["logprobs"] is None


def test_reasoning_is_split_off_and_the_finish_comes_in_a_chunk_of_its_own():
    fmt = ChatFormatter(reasoning_parser=_parser(registry.REASONING_PARSERS, "qwen3"))
    part = Part([1], None, None)
    shaper = fmt.shaper(_chat(), [part], 1)
    streamed = [
        c
        for text in ("<think>sky is", " blue</think>It is", " blue.")
        for c in shaper.chunk(0, part, _d(text))
    ]
    streamed += shaper.chunk(0, part, _d("", "stop", token_ids=[]))
    reasoning = "".join(c["delta"].get("reasoning_content", "") for c in streamed)
    content = "".join(c["delta"].get("content") or "" for c in streamed)
    assert (reasoning, content) == ("sky is blue", "It is blue.")
    assert all(c["delta"].get("reasoning") == c["delta"].get("reasoning_content") for c in streamed)
    assert streamed[-1] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
        "stop_reason": None,
    }
    [choice] = shaper.choices()
    assert choice["message"] == {
        "role": "assistant",
        "content": "It is blue.",
        "reasoning_content": "sky is blue",
        "reasoning": "sky is blue",
    }


def test_auto_tool_calls_are_numbered_across_chunks_and_finish_with_tool_calls():
    fmt = ChatFormatter(tool_parser=_parser(registry.TOOL_PARSERS, "hermes"))
    part = Part([1], None, None)
    shaper = fmt.shaper(_chat(tools=[WEATHER]), [part], 1)
    text = (
        '<tool_call>{"name": "w", "arguments": {"c": "Oslo"}}</tool_call>'
        '<tool_call>{"name": "w", "arguments": {"c": "Rome"}}</tool_call>'
    )
    chunks = shaper.chunk(0, part, _d(text[:40])) + shaper.chunk(0, part, _d(text[40:], "stop"))
    calls = [tc for c in chunks for tc in c["delta"].get("tool_calls", [])]
    assert [(tc["index"], tc["type"], tc["function"]["name"]) for tc in calls] == [
        (0, "function", "w"),
        (1, "function", "w"),
    ]
    assert [json.loads(tc["function"]["arguments"]) for tc in calls] == [{"c": "Oslo"}, {"c": "Rome"}]
    assert all(tc["id"].startswith("call_") for tc in calls)
    assert chunks[-1]["finish_reason"] == "tool_calls"
    [choice] = shaper.choices()
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert [tc["id"] for tc in choice["message"]["tool_calls"]] == [tc["id"] for tc in calls]
    assert "index" not in choice["message"]["tool_calls"][0]  # indices are for streamed deltas only


def test_text_without_a_call_keeps_its_finish_reason_and_content():
    fmt = ChatFormatter(tool_parser=_parser(registry.TOOL_PARSERS, "hermes"))
    part = Part([1], None, None)
    shaper = fmt.shaper(_chat(tools=[WEATHER]), [part], 1)
    chunks = shaper.chunk(0, part, _d("no tools here", "length"))
    assert "".join(c["delta"].get("content") or "" for c in chunks) == "no tools here"
    assert chunks[-1]["finish_reason"] == "length"
    [choice] = shaper.choices()
    assert choice["finish_reason"] == "length"
    assert choice["message"] == {"role": "assistant", "content": "no tools here"}


def test_auto_tools_without_a_parser_are_refused():
    with pytest.raises(oa.APIError, match="--tool-call-parser") as refused:
        ChatFormatter().check(_chat(tools=[WEATHER]))
    assert refused.value.param == "tool_choice"
    ChatFormatter().check(_chat(tools=[WEATHER], tool_choice="none"))


# ---- completions --------------------------------------------------------------------------


def test_batched_prompts_number_choices_prompt_major():
    parts = [Part([1], "a", None), Part([2], "b", None)]
    shaper = CompletionFormatter().shaper(_completion(prompt=["a", "b"], n=2, seed=1), parts, 2)
    for index, text in [(3, "d"), (0, "a"), (2, "c"), (1, "b")]:
        [chunk] = shaper.chunk(index, parts[index // 2], _d(text, "length", stop_reason=None))
        assert (chunk["index"], chunk["text"], chunk["finish_reason"], chunk["stop_reason"]) == (
            index,
            text,
            "length",
            None,
        )
    assert [(c["index"], c["text"]) for c in shaper.choices()] == [(0, "a"), (1, "b"), (2, "c"), (3, "d")]


def test_a_stop_string_is_the_stop_reason_and_an_unfinished_choice_ends_with_stop():
    part = Part([1], "x", None)
    shaper = CompletionFormatter().shaper(_completion(n=2, seed=1), [part], 2)
    first = shaper.chunk(0, part, _d("ab"))[0]
    assert "stop_reason" not in first and first["finish_reason"] is None
    last = shaper.chunk(0, part, _d("c", "stop", stop_reason="\n"))[0]
    assert (last["finish_reason"], last["stop_reason"]) == ("stop", "\n")
    c0, c1 = shaper.choices()
    assert (c0["text"], c0["finish_reason"], c0["stop_reason"]) == ("abc", "stop", "\n")
    assert (c1["text"], c1["finish_reason"], c1["stop_reason"]) == ("", "stop", None)


def test_logprobs_carry_text_offsets_through_the_echoed_prompt(tok):
    prompt = tok.encode("red river", add_special_tokens=False)
    post = PostProcessor(tok, 1, prompt_tokens=len(prompt), stops=[])
    # The engine's prompt logprobs: none for the first token, then [logprob, [[id, logprob]]].
    post.prompt_logprobs = [None] + [[-1.0, [[t, -1.0]]] for t in prompt[1:]]
    part = Part(prompt, "red river", post)
    shaper = CompletionFormatter().shaper(_completion(prompt="red river", echo=True, logprobs=1), [part], 1)
    gen = [[" x", -0.5, [[" x", -0.5]]]]
    [chunk] = shaper.chunk(0, part, _d(" x", "length", logprobs=gen))
    assert chunk["text"] == "red river x"
    lp = chunk["logprobs"]
    assert "".join(lp["tokens"]) == "red river x" and lp["tokens"][-1] == " x"
    assert lp["token_logprobs"][0] is None and lp["token_logprobs"][1:] == [-1.0] * (len(prompt) - 1) + [-0.5]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][-1] == {" x": -0.5}
    starts = [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert lp["text_offset"] == starts
    [choice] = shaper.choices()  # the whole choice counts its offsets from 0 again
    assert choice["text"] == "red river x" and choice["logprobs"] == lp


def test_max_tokens_zero_with_echo_gives_the_prompt_only(tok):
    part = Part([5, 6], "the prompt", PostProcessor(tok, 1, prompt_tokens=2, stops=[]))
    shaper = CompletionFormatter().shaper(
        _completion(prompt="the prompt", echo=True, max_tokens=0), [part], 1
    )
    [chunk] = shaper.chunk(0, part, _d("ignored", "length"))
    assert chunk["text"] == "the prompt" and chunk["logprobs"] is None
    assert shaper.chunk(0, part, _d("more")) == []  # echoed once
    assert shaper.choices()[0]["text"] == "the prompt"


def test_prompt_logprobs_are_keyed_by_token_id_with_their_text(tok):
    ids = tok.encode("cat dog", add_special_tokens=False)
    post = PostProcessor(tok, 1, prompt_tokens=len(ids), stops=[])
    part = Part(ids, None, post)
    assert prompt_logprobs_json(part) is None  # not asked for
    post.prompt_logprobs = [None, [-2.0, [[ids[0], -0.25]]]]
    want_second = {
        str(ids[0]): {"logprob": -0.25, "decoded_token": tok.decode([ids[0]], skip_special_tokens=False)},
        str(ids[1]): {"logprob": -2.0, "decoded_token": tok.decode([ids[1]], skip_special_tokens=False)},
    }
    assert prompt_logprobs_json(part) == [None, want_second]
    shaper = CompletionFormatter().shaper(_completion(prompt_logprobs=1), [part], 1)
    assert shaper.chunk(0, part, _d("a"))[0]["prompt_logprobs"] == [None, want_second]
    assert "prompt_logprobs" not in shaper.chunk(0, part, _d("b", "stop"))[0]  # once per choice
    assert shaper.choices()[0]["prompt_logprobs"] == [None, want_second]


def test_chat_echo_and_stop_reason_are_vllms():
    part = Part([1, 2], None, None)
    messages = [*USER, {"role": "assistant", "content": "the old"}]
    req = _chat(messages=messages, echo=True, continue_final_message=True, add_generation_prompt=False)
    assert req.prompt_logprobs == 0  # echo asks the prompt's logprobs, as vLLM (top_logprobs of them)
    whole = ChatFormatter().shaper(req, [part], 1)
    whole.chunk(0, part, _d(" cat", "stop", stop_reason="x"))
    [choice] = whole.choices()
    assert choice["message"]["content"] == "the old cat" and choice["stop_reason"] == "x"
    streamed = ChatFormatter().shaper(
        _chat(messages=messages, echo=True, add_generation_prompt=False, stream=True), [part], 1
    )
    assert [c["delta"] for c in streamed.opening()] == [
        {"role": "assistant", "content": ""},
        {"content": "the old"},
    ]
    # Under add_generation_prompt the response is the assistant's: a user's last message is not echoed.
    assert ChatFormatter().shaper(_chat(echo=True), [part], 1).opening()[1:] == []
