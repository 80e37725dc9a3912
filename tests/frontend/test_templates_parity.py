"""Chat prompts dynvllm builds equal the ones vLLM's server code builds, byte for byte and token
for token: the same request bodies go through vLLM's own renderer (its request model, chat
params, message parsing, content-format detection and `safe_apply_chat_template`, in process)
and through dynvllm's chat formatter, over templates written in the shape of the Llama 3.1,
Qwen3, Mistral, DeepSeek-R1 and Gemma families (strftime_now, tools, tool history, image
parts, {% generation %}, enable_thinking, reasoning_effort, developer role).

Image parts: vLLM fetches an image only to hand it to a multimodal processor (the tiny model
has none); the text of an "openai"-format prompt does not depend on it, so vLLM's image loader
is replaced by a no-op on its side. More templates can be checked by pointing
DYNVLLM_PARITY_TEMPLATES at a folder of .jinja files."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from dynvllm.frontend.models import ModelEntry
from dynvllm.frontend.openai import schema as oa
from dynvllm.frontend.openai.formatters import ChatFormatter
from dynvllm.frontend.templates import content_format
from dynvllm.frontend.tokenizer import Tokenizer
from dynvllm_plugins.parsers.hermes import HermesToolParser

#: Templates written for these tests in the shape of each family's published one.
TEMPLATE_DIR = Path(__file__).parent / "chat_templates"
TEMPLATES: dict[str, str | None] = {f.stem: f.read_text() for f in sorted(TEMPLATE_DIR.glob("*.jinja"))}
TEMPLATES["model"] = None  # the tiny model's own template
LLAMA31, QWEN3, MISTRAL, GEMMA, EFFORT = (
    TEMPLATES[n] for n in ("llama3.1", "qwen3", "mistral", "gemma", "effort")
)
if os.environ.get("DYNVLLM_PARITY_TEMPLATES"):
    for f in sorted(Path(os.environ["DYNVLLM_PARITY_TEMPLATES"]).glob("*.jinja")):
        TEMPLATES[f.stem] = f.read_text()

IMAGE = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5"
    "ErkJggg=="
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
CALL = {
    "id": "call_abcdefghij",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
BODIES = {
    "plain": {"messages": [{"role": "user", "content": "Hello there"}]},
    "system_multi_turn": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three"},
        ]
    },
    "tools_and_history": {
        "messages": [
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {
                "role": "tool",
                "tool_call_id": "call_abcdefghij",
                "content": [{"type": "text", "text": "sunny"}],
            },
        ],
        "tools": [WEATHER, TIME],
    },
    "tools_choice_none": {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [WEATHER],
        "tool_choice": "none",
    },
    "image_parts": {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in"},
                    {"type": "image_url", "image_url": {"url": IMAGE}},
                    {"type": "text", "text": "this picture?"},
                ],
            }
        ]
    },
    "developer_role": {
        "messages": [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "hi"}]
    },
    "continue_final": {
        "messages": [{"role": "user", "content": "count"}, {"role": "assistant", "content": "one two "}],
        "continue_final_message": True,
        "add_generation_prompt": False,
    },
    "thinking_off_and_kwargs": {
        "messages": [{"role": "user", "content": "quick"}],
        "chat_template_kwargs": {"enable_thinking": False, "custom_flag": 7, "unused": "x", "skipped": None},
    },
    "reasoning_effort": {"messages": [{"role": "user", "content": "think hard"}], "reasoning_effort": "high"},
    "reasoning_history": {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "reasoning": "because"},
            {"role": "user", "content": "c"},
        ]
    },
}


@pytest.fixture(scope="module")
def vllm_render(tiny_model):
    """vLLM's server-side rendering of a chat request body, in this process."""
    from vllm.config import ModelConfig
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.renderers.chat_utils import MultiModalContentParser, parse_chat_messages
    from vllm.renderers.hf import resolve_chat_template_content_format, safe_apply_chat_template
    from vllm.renderers.params import merge_kwargs
    from vllm.tokenizers import get_tokenizer

    config = ModelConfig(model=str(tiny_model), tokenizer=str(tiny_model))
    tok = get_tokenizer(str(tiny_model))

    def render(body: dict, server_template: str | None) -> tuple[str, list[int]]:
        req = ChatCompletionRequest.model_validate({"model": "tiny", **copy.deepcopy(body)})
        tools = None if req.tools is None else [t.model_dump() for t in req.tools]
        params = req.build_chat_params(server_template, "auto").with_defaults(
            merge_kwargs(None, {"tools": tools, "tokenize": False})
        )
        fmt = resolve_chat_template_content_format(
            params.chat_template, params.chat_template_kwargs.get("tools"), "auto", tok, model_config=config
        )
        conversation, _, _ = parse_chat_messages(req.messages, config, content_format=fmt)
        text = safe_apply_chat_template(config, tok, conversation, **params.get_apply_chat_template_kwargs())
        return text, tok.encode(text, add_special_tokens=False)

    saved = MultiModalContentParser.parse_image
    MultiModalContentParser.parse_image = lambda self, url, uuid=None: None  # type: ignore[method-assign]
    try:
        yield render
    finally:
        MultiModalContentParser.parse_image = saved  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def entry(tiny_model) -> ModelEntry:
    return ModelEntry("tiny", {}, tokenizer=Tokenizer(tiny_model))


def _dynvllm(entry: ModelEntry, body: dict, template: str | None) -> tuple[str, list[int]]:
    req = oa.validate(oa.ChatRequest, {"model": "tiny", **copy.deepcopy(body)})
    # A tool parser, as a server that takes tool_choice "auto" has one.
    fmt = ChatFormatter(tool_parser=HermesToolParser(), chat_template=template)
    ids = fmt.prompts(entry, req)[0][0]
    tok = entry.tokenizer
    assert tok is not None
    messages = [m.model_dump(exclude_unset=True) for m in req.messages]
    text = tok.apply_chat_template(messages, fmt.template(entry, req), **req.template_arguments())
    return text, ids


@pytest.mark.parametrize("body_name", sorted(BODIES))
@pytest.mark.parametrize("template_name", list(TEMPLATES))
def test_prompt_equals_vllms_byte_for_byte(entry, vllm_render, template_name, body_name):
    template, body = TEMPLATES[template_name], BODIES[body_name]
    if body_name == "image_parts" and content_format(template or entry.tokenizer.chat_template) == "string":
        pytest.skip("a template that reads content as text gets vLLM's per-model image placeholder")
    try:
        want_text, want_ids = vllm_render(body, template)
    except Exception:  # the template refuses the conversation: so must dynvllm, as a 400
        with pytest.raises(oa.APIError) as refused:
            _dynvllm(entry, body, template)
        assert refused.value.status == 400
        return
    got_text, got_ids = _dynvllm(entry, body, template)
    assert got_text == want_text
    assert got_ids == want_ids


def test_the_features_the_templates_rely_on_are_exercised(entry, vllm_render):
    """The cases above would pass vacuously if the features rendered to nothing."""
    import datetime

    text, _ = _dynvllm(entry, BODIES["plain"], LLAMA31)
    assert datetime.datetime.now().strftime("%d %b %Y") in text  # strftime_now
    text, _ = _dynvllm(entry, BODIES["image_parts"], GEMMA)
    assert "What is in<start_of_image>this picture?" in text  # image parts, "openai" format
    text, _ = _dynvllm(entry, BODIES["tools_choice_none"], QWEN3)
    assert '"name": "get_weather"' in text  # tools reach the template under tool_choice none, as vLLM
    text, _ = _dynvllm(entry, BODIES["thinking_off_and_kwargs"], EFFORT)
    assert text.endswith("<|thinking|>False<|flag|>7<|assistant|>")
    text, _ = _dynvllm(entry, BODIES["reasoning_effort"], EFFORT)
    assert text.endswith("<|effort|>high<|thinking|>True<|assistant|>")
    text, _ = _dynvllm(entry, BODIES["developer_role"], MISTRAL)
    assert "[SYSTEM_PROMPT]Answer in French.[/SYSTEM_PROMPT]" in text  # developer -> system
    text, _ = _dynvllm(entry, BODIES["continue_final"], QWEN3)
    assert text.endswith("<|im_start|>assistant\none two ")
    text, _ = _dynvllm(entry, BODIES["system_multi_turn"], GEMMA)
    assert "<start_of_turn>model\ntwo<end_of_turn>" in text  # {% generation %} renders its body
