"""vLLM's own tool-call and reasoning parsers behind dynvllm's chat formatter, on recorded model
outputs: what dynvllm answers equals what vLLM's server code makes of the same tokens (its
`Parser`, driven in process as its chat serving drives it: `parse` on a whole output,
`parse_delta` per streamed token), streamed and not; dynvllm's own parsers are held to vLLM's
on the same outputs; an unknown name is refused with the names there are; a
--tool-parser-plugin file registers names as vLLM loads it."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest

from dynvllm.frontend.openai import schema as oa
from dynvllm.frontend.openai.formatters import ChatFormatter
from dynvllm.frontend.postprocess import ChoiceDelta, PostProcessor
from dynvllm.frontend.request_path import Part
from dynvllm.frontend.tokenizer import Tokenizer
from dynvllm.frontend.vllm_parsers import VllmParsers, check_name

MARKERS = ["<tool_call>", "</tool_call>", "<think>", "</think>", "[TOOL_CALLS]", "<|python_tag|>"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}

#: (tool parser, reasoning parser, recorded output)
RECORDED = [
    (
        "hermes",
        None,
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    ),
    ("hermes", None, "No tools needed: 2 < 3 and <tool is not a tag."),
    (
        "hermes",
        "qwen3",
        '<think>\nneed the weather\n</think>\n\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Oslo"}}\n</tool_call>',
    ),
    ("llama3_json", None, '{"name": "get_weather", "parameters": {"city": "Rome", "days": 1}}'),
    ("llama3_json", None, "The answer is {maybe}."),
    ("pythonic", None, '[get_weather(city="San Francisco", days=3), get_time()]'),
    ("pythonic", None, "Plain answer."),
    ("llama4_pythonic", None, '[get_weather(city="Lima")]'),
    ("phi4_mini_json", None, 'functools[{"name": "get_weather", "arguments": {"city": "Kyiv"}}]'),
    (
        "qwen3_coder",
        None,
        "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nBern\n</parameter>\n"
        "<parameter=days>\n4\n</parameter>\n</function>\n</tool_call>",
    ),
    (None, "qwen3", "<think>\nlet me see</think>\n\nParis."),
    (None, "qwen3", "Paris, without thinking."),
    (None, "deepseek_r1", "Thinking about it.</think>The answer is 4."),
]
#: dynvllm's own parsers on the same outputs.
OWN = [(t, r, text) for t, r, text in RECORDED if t in {"hermes", "llama3_json", "pythonic", None}]
#: Where dynvllm's own parsers answer otherwise (docs/compatibility.md), (reasoning, content) by
#: vLLM's and by dynvllm's: the whitespace between a reasoning block and a tool call stays
#: content with dynvllm's; vLLM's qwen3 reads the prompt (a prompt that leaves a think block open
#: makes an output without </think> all reasoning), dynvllm's reads the output only.
OWN_DIFFERS = {
    ("hermes", "qwen3"): (("\nneed the weather\n", ""), ("\nneed the weather\n", "\n\n")),
    (None, "qwen3", "Paris, without thinking."): (
        ("Paris, without thinking.", ""),
        ("", "Paris, without thinking."),
    ),
}


@pytest.fixture(scope="module")
def folder(tiny_model, tmp_path_factory) -> Path:
    """The tiny model's tokenizer with the markers as single tokens, as the models that emit
    them have."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_model))
    hf.add_tokens(MARKERS)
    out = tmp_path_factory.mktemp("markers")
    hf.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tok(folder) -> Tokenizer:
    return Tokenizer(folder)


@lru_cache
def _parsers(tool: str | None, reasoning: str | None) -> VllmParsers:
    return VllmParsers(tool, reasoning)  # its tokenizers load once


def _deltas(tok: Tokenizer, text: str) -> list[tuple[str, list[int]]]:
    """The recorded output as the engine streams it: one token per delta, detokenized, and the
    end-of-sequence token that stopped it (no text)."""
    ids = tok.encode(text, add_special_tokens=False) + tok.encode("<|im_end|>", add_special_tokens=False)
    stream = tok.decode_stream()
    return [(stream.step(t), [t]) for t in ids]


def _body(tool: str | None, stream: bool) -> dict:
    body: dict = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if tool:
        body["tools"] = [WEATHER, TIME]
    return body


def _vllm(parsers: VllmParsers, folder: Path, tool: str | None, text: str, deltas, prompt: list[int]):
    """What vLLM's chat serving makes of the output: (reasoning, content, [(name, arguments)]),
    whole and streamed."""
    request = parsers.request(_body(tool, False))
    parser = parsers.cls(parsers.tokenizer(folder), request.tools, chat_template_kwargs=None)
    parser.set_prompt_token_ids(prompt)
    ids = [t for _, d in deltas for t in d]
    reasoning, content, calls = parser.parse(
        text, request, enable_auto_tools=True, model_output_token_ids=ids
    )
    whole = (reasoning or "", content or "", [(c.name, c.arguments) for c in calls or ()])
    request = parsers.request(_body(tool, True))
    parser = parsers.cls(parsers.tokenizer(folder), request.tools, chat_template_kwargs=None)
    r, c, frags = "", "", {}
    for k, (delta, d_ids) in enumerate(deltas):
        msg = parser.parse_delta(delta, d_ids, request, prompt, finished=k == len(deltas) - 1)
        if msg is None:
            continue
        r, c = r + (msg.reasoning or ""), c + (msg.content or "")
        for tc in msg.tool_calls or ():
            f = frags.setdefault(tc.index, ["", ""])
            f[0] += (tc.function.name or "") if tc.function else ""
            f[1] += (tc.function.arguments or "") if tc.function else ""
    streamed = (r, c, [tuple(f) for _, f in sorted(frags.items())])
    return whole, streamed


def _dynvllm(fmt: ChatFormatter, tok: Tokenizer, tool: str | None, deltas, prompt: list[int], stream: bool):
    req = oa.validate(oa.ChatRequest, _body(tool, stream))
    fmt.check(req)
    part = Part(prompt, None, PostProcessor(tok, 1, len(prompt), []))
    shaper = fmt.shaper(req, [part], 1)
    r, c, calls, finish = "", "", [], None
    for k, (delta, ids) in enumerate(deltas):
        last = k == len(deltas) - 1
        for choice in shaper.chunk(
            0, part, ChoiceDelta(0, delta, ids, finish_reason="stop" if last else None)
        ):
            d = choice["delta"]
            r += d.get("reasoning_content") or ""
            c += d.get("content") or ""
            calls += [(t["function"]["name"], t["function"]["arguments"]) for t in d.get("tool_calls") or ()]
            finish = choice["finish_reason"] or finish
    if stream:
        return (r, c, calls), finish
    msg = shaper.choices()[0]
    m = msg["message"]
    got = (
        m.get("reasoning_content") or "",
        m["content"] or "",
        [(t["function"]["name"], t["function"]["arguments"]) for t in m.get("tool_calls") or ()],
    )
    return got, msg["finish_reason"]


@pytest.mark.parametrize("tool,reasoning,text", RECORDED)
def test_vllms_parsers_through_dynvllm_answer_as_vllms_server(folder, tok, tool, reasoning, text):
    parsers = _parsers(tool, reasoning)
    fmt = ChatFormatter(vllm_parsers=parsers)
    prompt = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    deltas = _deltas(tok, text)
    assert "".join(d for d, _ in deltas) == text
    whole, streamed = _vllm(parsers, folder, tool, text, deltas, prompt)
    got, finish = _dynvllm(fmt, tok, tool, deltas, prompt, stream=False)
    assert got == whole
    assert finish == ("tool_calls" if whole[2] else "stop")
    got, finish = _dynvllm(fmt, tok, tool, deltas, prompt, stream=True)
    assert got == streamed
    assert finish == ("tool_calls" if streamed[2] else "stop")


@pytest.mark.parametrize("tool,reasoning,text", OWN)
def test_dynvllms_own_parsers_answer_as_vllms_on_the_recorded_outputs(folder, tok, tool, reasoning, text):
    from dynvllm import registry

    own = ChatFormatter(
        registry.load(registry.TOOL_PARSERS, tool)() if tool else None,
        registry.load(registry.REASONING_PARSERS, reasoning)() if reasoning else None,
    )
    parsers = _parsers(tool, reasoning)
    prompt = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    deltas = _deltas(tok, text)
    whole, _ = _vllm(parsers, folder, tool, text, deltas, prompt)
    differs = OWN_DIFFERS.get((tool, reasoning)) or OWN_DIFFERS.get((tool, reasoning, text))
    if differs is not None:
        theirs, ours = differs
        assert whole[:2] == theirs
        whole = (*ours, whole[2])
    for stream in (False, True):
        (r, c, calls), _ = _dynvllm(own, tok, tool, deltas, prompt, stream)
        # Arguments as JSON values: dynvllm writes them compactly where vLLM keeps the model's spacing.
        assert (r, c, [(n, json.loads(a)) for n, a in calls]) == (
            whole[0],
            whole[1],
            [(n, json.loads(a)) for n, a in whole[2]],
        )


def test_an_unknown_parser_name_lists_dynvllms_and_vllms():
    with pytest.raises(ValueError) as exc:
        check_name("tool", "hermez", ["hermes"], None)
    assert "hermez" in str(exc.value) and "hermes" in str(exc.value) and "kimi_k2" in str(exc.value)
    with pytest.raises(ValueError, match="qwen3"):
        check_name("reasoning", "vllm:nope", [], None)
    check_name("tool", "vllm:hermes", ["hermes"], None)
    check_name("tool", "glm47", ["hermes"], None)


def test_a_tool_parser_plugin_file_registers_its_names(tmp_path, folder, tok):
    plugin = tmp_path / "my_parser.py"
    plugin.write_text(
        "from vllm.tool_parsers import ToolParserManager\n"
        "from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser\n\n\n"
        '@ToolParserManager.register_module("my_hermes")\n'
        "class MyHermes(Hermes2ProToolParser):\n"
        "    pass\n"
    )
    parsers = VllmParsers("my_hermes", None, str(plugin))
    fmt = ChatFormatter(vllm_parsers=parsers)
    text = RECORDED[0][2]
    prompt = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    (_, content, calls), finish = _dynvllm(fmt, tok, "my_hermes", _deltas(tok, text), prompt, stream=False)
    assert content == "Let me check.\n" and [n for n, _ in calls] == ["get_weather", "get_time"]
    assert finish == "tool_calls"
    with pytest.raises(ValueError, match="not registered in vLLM"):
        VllmParsers("their_hermes", None, str(plugin))


def test_the_parsers_adjustment_keeps_special_tokens_and_the_stop_token_out_of_the_text(folder, tok):
    """vLLM's hermes asks for special tokens in the text it reads; the token that stopped the
    output stays out of it, as vLLM's detokenizer leaves it out. Through the whole chat path:
    template, post-processing of the engine's token deltas, shaping."""
    from dynvllm.frontend.models import ModelEntry

    parsers = _parsers("hermes", None)
    fmt = ChatFormatter(vllm_parsers=parsers)
    text = RECORDED[0][2]
    ids = tok.encode(text, add_special_tokens=False) + tok.encode("<|im_end|>", add_special_tokens=False)
    for stream in (False, True):
        req = oa.validate(oa.ChatRequest, _body("hermes", stream))
        [(prompt, _)] = fmt.prompts(ModelEntry("tiny", {}, tokenizer=tok), req)
        assert req.skip_special_tokens is False
        post = PostProcessor(tok, 1, len(prompt), [], skip_special=req.skip_special_tokens)
        part = Part(prompt, None, post)
        shaper = fmt.shaper(req, [part], 1)
        content, calls = "", []
        for k, t in enumerate(ids):
            d = post.feed(
                {"index": 0, "token_ids": [t], "finish_reason": "stop" if k == len(ids) - 1 else None}
            )
            assert d is not None
            for choice in shaper.chunk(0, part, d):
                content += choice["delta"].get("content") or ""
                calls += [
                    (c["function"]["name"], c["function"]["arguments"])
                    for c in choice["delta"].get("tool_calls") or ()
                ]
        whole, streamed = _vllm(parsers, folder, "hermes", text, _deltas(tok, text), prompt)
        if stream:
            assert (content, calls) == (streamed[1], streamed[2])
            assert "<|im_end|>" not in content
        else:
            message = shaper.choices()[0]["message"]
            got = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
            assert (message["content"], got) == (whole[1], whole[2])
