"""Chat prompts as vLLM's server builds them: its message normalization, its choice of template
and of template variables, rendered by transformers' own Jinja renderer (`strftime_now`,
`{% generation %}`, `raise_exception`, `tojson` as Hugging Face defines them).

vLLM's renderer module imports torch and most of vLLM (seconds, ~0.5 GB), too much for the
frontend; this module keeps to jinja2 and transformers' chat-template utilities (imported on the
first render). tests/frontend/test_templates_parity.py holds it to vLLM's own code, byte for byte.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

#: transformers' named special tokens: each reaches the template as a variable.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

#: Parameters of transformers' `apply_chat_template`: a template variable of the same name is
#: taken from chat_template_kwargs even when the template does not read it (as vLLM accepts them).
_APPLY_PARAMS = frozenset(
    {
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)

#: vLLM's templates for model types whose hub files have none (its chat_templates registry).
_FALLBACKS = {
    "blip-2": "template_blip2.jinja",
    "clip": "template_basic.jinja",
    "colpali": "template_basic.jinja",
    "deepseek_ocr": "template_deepseek_ocr.jinja",
    "deepseek_ocr2": "template_deepseek_ocr.jinja",
    "unlimited-ocr": "template_deepseek_ocr.jinja",
    "unlimited_ocr": "template_deepseek_ocr.jinja",
    "deepseek_vl_v2": "template_deepseek_vl2.jinja",
    "paligemma": "template_basic.jinja",
    "siglip": "template_basic.jinja",
    "siglip2": "template_basic.jinja",
}

#: Content part types read as text (vLLM's TEXT_PART_TYPES).
_TEXT_PARTS = frozenset({"text", "input_text", "output_text", "refusal", "thinking"})
#: Keys of the content part types vLLM knows: the others in a part reach the template as they are.
_KNOWN_PART_FIELDS = frozenset(
    {
        "audio_embeds",
        "audio_url",
        "data",
        "file",
        "image_embeds",
        "image_pil",
        "image_url",
        "input_audio",
        "name",
        "refusal",
        "text",
        "thinking",
        "type",
        "uuid",
        "video_embeds",
        "video_url",
        "closed",
        "prompt_cache_breakpoint",
    }
)
_MEDIA_PARTS = {
    "image_url": "image",
    "input_image": "image",
    "image_pil": "image",
    "image_embeds": "image",
    "audio_url": "audio",
    "input_audio": "audio",
    "audio_embeds": "audio",
    "video_url": "video",
    "video_embeds": "video",
}
_BILLING_HEADER = "x-anthropic-billing-header"


class TemplateError(ValueError):
    """The request cannot be rendered (a client's error: 400)."""


def builtin_templates_dir() -> Path | None:
    """vLLM's folder of built-in chat templates, found without importing vLLM."""
    spec = find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "transformers_utils" / "chat_templates"


def fallback_template(model_type: str | None) -> str | None:
    name = _FALLBACKS.get(model_type or "")
    where = builtin_templates_dir()
    if name is None or where is None or not (where / name).exists():
        return None
    return (where / name).read_text()


# ---- the template's content format (vLLM's detection, on the template's syntax tree) ----------
def _is_var(node: Any, name: str) -> bool:
    from jinja2 import nodes

    return isinstance(node, nodes.Name) and node.ctx == "load" and node.name == name


def _is_attr(node: Any, name: str, key: str) -> bool:
    from jinja2 import nodes

    if isinstance(node, nodes.Getitem):
        return _is_var(node.node, name) and isinstance(node.arg, nodes.Const) and node.arg.value == key
    if isinstance(node, nodes.Getattr):
        return _is_var(node.node, name) and node.attr == key
    return False


def _is_var_or_elems(node: Any, name: str, key: str | None = None) -> bool:
    from jinja2 import nodes

    if isinstance(node, nodes.Filter):
        return node.node is not None and _is_var_or_elems(node.node, name, key)
    if isinstance(node, nodes.Test):
        return _is_var_or_elems(node.node, name, key)
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Slice):
        return _is_var_or_elems(node.node, name, key)
    return _is_attr(node, name, key) if key else _is_var(node, name)


def _aliases(root: Any, name: str) -> Iterator[str]:
    from jinja2 import nodes

    yield name
    todo = deque([name])
    while todo:
        current = todo.popleft()
        for assign in root.find_all(nodes.Assign):
            if _is_var_or_elems(assign.node, current):
                yield assign.target.name
                if assign.target.name != current:
                    todo.append(assign.target.name)


def _message_vars(root: Any) -> Iterator[str]:
    from jinja2 import nodes

    names = list(_aliases(root, "messages"))
    for loop in root.find_all(nodes.For):
        if any(_is_var_or_elems(loop.iter, n) for n in names):
            yield loop.target.name


def _content_loops(root: Any) -> Iterator[str]:
    from jinja2 import nodes

    messages = list(_message_vars(root))
    params_by_loop: dict[int, set[str]] = {}
    in_macros: set[int] = set()
    for macro in root.find_all(nodes.Macro):
        names = {a.name for a in macro.args}
        params: set[str] = set()
        for call in root.find_all(nodes.Call):
            if isinstance(call.node, nodes.Name) and call.node.name == macro.name:
                for i, arg in enumerate(call.args):
                    if i < len(macro.args) and any(_is_var_or_elems(arg, m, "content") for m in messages):
                        params.add(macro.args[i].name)
                for kw in call.kwargs:
                    if (
                        isinstance(kw, nodes.Keyword)
                        and kw.key in names
                        and any(_is_var_or_elems(kw.value, m, "content") for m in messages)
                    ):
                        params.add(kw.key)
        for loop in macro.find_all(nodes.For):
            in_macros.add(id(loop))
            if params:
                params_by_loop[id(loop)] = params
    for loop in root.find_all(nodes.For):
        if any(_is_var_or_elems(loop.iter, m, "content") for m in messages):
            yield loop.target.name
            continue
        bound = params_by_loop.get(id(loop))
        if isinstance(loop.iter, nodes.Name) and bound is not None and loop.iter.name in bound:
            yield loop.target.name
            continue
        if id(loop) not in in_macros and isinstance(loop.iter, nodes.Name) and loop.iter.name == "content":
            yield loop.target.name


@lru_cache(maxsize=32)
def content_format(template: str) -> str:
    """ "openai" when the template walks a message's content parts, else "string" (text joined)."""
    try:
        root = compiled(template).environment.parse(template)
        next(_content_loops(root))
    except StopIteration:
        return "string"
    except Exception:
        return "string"
    return "openai"


# ---- messages as vLLM hands them to the template ---------------------------------------------
def _strip_billing_header(parts: list[Any]) -> list[Any]:
    out: list[Any] = []
    for part in parts:
        text = part if isinstance(part, str) else part.get("text") if part.get("type") == "text" else None
        if not (isinstance(text, str) and text.startswith(_BILLING_HEADER)):
            out.append(part)
            continue
        rest = text.partition("\n")[2]
        if rest:
            out.append(rest if isinstance(part, str) else {**part, "text": rest})
    return out


def _extra_fields(part: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in part.items() if k not in _KNOWN_PART_FIELDS}


def _parts(parts: list[Any], wrap: bool) -> list[Any] | str:
    items: list[Any] = []
    for part in parts:
        if isinstance(part, str):
            items.append({"type": "text", "text": part} if wrap else part)
            continue
        kind = part.get("type")
        if kind in _TEXT_PARTS:
            text = part.get(kind if kind in ("refusal", "thinking") else "text")
            if text is None or (not wrap and not text):
                continue  # vLLM drops empty texts when it joins them
            items.append({"type": "text", "text": text, **_extra_fields(part)} if wrap else text)
        elif kind in _MEDIA_PARTS:
            if not wrap:
                raise TemplateError(
                    "this chat template does not place images (it reads content as a string): "
                    "start the server with --mm-prompt-template, or use a template that handles them"
                )
            items.append({"type": _MEDIA_PARTS[kind], **_extra_fields(part)})
        elif kind == "tool_reference":
            items.append({"type": "tool_reference", "name": part.get("name")} if wrap else part.get("name"))
        else:
            raise TemplateError(f"Unsupported chat content part type: {kind!r}")
    return items if wrap else "\n".join(items)


def _call_fields(call: Any) -> Any:
    """A tool call's keys in the order of OpenAI's typed message (id, function {arguments, name},
    type) and only those, as vLLM's request model leaves them: a template that prints a call's
    JSON whole prints it the same."""
    if not isinstance(call, dict):
        return call
    out = {k: call[k] for k in ("id", "function", "type") if k in call}
    fn = out.get("function")
    if isinstance(fn, dict):
        out["function"] = {k: fn[k] for k in ("arguments", "name") if k in fn}
    return out


def _arguments(value: Any) -> dict:
    if not value:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}  # history with broken arguments still renders, as vLLM lets it
    return value if isinstance(value, dict) else {}


def conversation(messages: list[dict[str, Any]], fmt: str) -> list[dict[str, Any]]:
    """OpenAI chat messages as vLLM gives them to a template of content format `fmt`."""
    out: list[dict[str, Any]] = []
    for msg in messages:
        role, content = msg["role"], msg.get("content")
        if content is None:
            content = []
        elif isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if role == "system":
            content = _strip_billing_header(content)
        conv: dict[str, Any] = {"role": role, "content": _parts(content, fmt == "openai")}
        if role == "assistant":
            if msg.get("tool_calls") is not None:
                conv["tool_calls"] = [_call_fields(c) for c in msg["tool_calls"]]
            if msg.get("reasoning") is not None:
                conv["reasoning"] = conv["reasoning_content"] = msg["reasoning"]
        elif role == "tool":
            if "tool_call_id" in msg:
                conv["tool_call_id"] = msg["tool_call_id"]
            parts = conv["content"]
            if isinstance(parts, list) and all(
                isinstance(p, dict) and p.get("type") == "text" for p in parts
            ):
                conv["content"] = "\n".join(p.get("text", "") for p in parts)
        if isinstance(msg.get("name"), str):
            conv["name"] = msg["name"]
        if isinstance(msg.get("task"), str):
            conv["task"] = msg["task"]
        if role == "developer":
            conv["tools"] = msg.get("tools")
        out.append(conv)
    for conv in out:
        calls = conv.get("tool_calls")
        if conv["role"] != "assistant" or not isinstance(calls, list):
            continue
        if not calls:
            del conv["tool_calls"]
            continue
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or call.get("type", "function") != "function":
                raise TemplateError("chat completions only support assistant tool_calls of type 'function'")
            fn["arguments"] = _arguments(fn.get("arguments"))
    return out


def _developer_as_system(conv: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vLLM's rewrite for templates that know no developer role: system messages, merged first."""
    conv = [
        {**{k: v for k, v in m.items() if k != "tools"}, "role": "system"} if m["role"] == "developer" else m
        for m in conv
    ]
    systems: list[str] = []
    rest: list[dict[str, Any]] = []
    merge = False
    for i, m in enumerate(conv):
        if m["role"] != "system":
            rest.append(m)
            continue
        if i > 0 or systems:
            merge = True
        content = m.get("content", "")
        if isinstance(content, list):
            content = "\n".join(
                p["text"] if isinstance(p, dict) else p for p in content if isinstance(p, str) or "text" in p
            )
        if content:
            systems.append(content)
    if not merge:
        return conv
    return [{"role": "system", "content": "\n\n".join(systems)}, *rest]


# ---- rendering -------------------------------------------------------------------------------
def compiled(template: str) -> Any:
    """The template compiled by transformers (cached there)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template)


@lru_cache(maxsize=32)
def template_variables(template: str) -> frozenset[str]:
    from jinja2 import meta

    return frozenset(meta.find_undeclared_variables(compiled(template).environment.parse(template)))


def select_kwargs(template: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The variables a template is given, as vLLM filters them: those it reads, and transformers'
    own parameters."""
    unexpected = {"chat_template", "tokenize"} & kwargs.keys()
    if unexpected:
        raise TemplateError(f"Found unexpected chat template kwargs from request: {unexpected}")
    accept = template_variables(template) | _APPLY_PARAMS
    return {k: v for k, v in kwargs.items() if k in accept}


def render(
    template: str,
    messages: list[dict[str, Any]],
    special_tokens: dict[str, str],
    kwargs: dict[str, Any],
) -> str:
    """The prompt text for OpenAI `messages`; `kwargs` are vLLM's template arguments (tools,
    add_generation_prompt, continue_final_message, documents, chat_template_kwargs ...)."""
    from jinja2 import TemplateError as JinjaError
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        conv = conversation(messages, content_format(template))
        if any(m["role"] == "developer" for m in conv) and not (
            '"developer"' in template or "'developer'" in template
        ):
            conv = _developer_as_system(conv)
        chosen = select_kwargs(template, kwargs)
        chosen.pop("return_dict", None)
        named = {k: chosen.pop(k) for k in ("tools", "documents") if k in chosen}
        add_generation_prompt = bool(chosen.pop("add_generation_prompt", False))
        continue_final_message = chosen.pop("continue_final_message", False)
        if continue_final_message and add_generation_prompt:
            raise TemplateError(
                "continue_final_message and add_generation_prompt are not compatible: send "
                "add_generation_prompt: false to continue the final message"
            )
        for k in _APPLY_PARAMS:
            chosen.pop(k, None)
        rendered, _ = render_jinja_template(
            conversations=[conv],
            tools=named.get("tools"),
            documents=named.get("documents"),
            chat_template=template,
            continue_final_message=continue_final_message,
            add_generation_prompt=add_generation_prompt,
            **{**special_tokens, **chosen},
        )
    except (JinjaError, ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, TemplateError):
            raise
        raise TemplateError(str(exc)) from None
    return rendered[0]
