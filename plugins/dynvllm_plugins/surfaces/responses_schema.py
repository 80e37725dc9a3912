"""OpenAI's Responses request as the chat request it means (pure logic).

A Responses request (instructions, input items, previous turns from the store) becomes an OpenAI
chat request, so its prompt is built by the same chat template and its output goes through the same
tool and reasoning parsers as /v1/chat/completions. Every field of the Responses schema is listed
here: implemented, or refused with a 400 that names it when a client asks for it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dynvllm.frontend import bodies
from dynvllm.frontend.errors import RequestError
from dynvllm.frontend.openai import schema as oa

#: vLLM's sampling extensions of the Responses request, passed to the chat request as they are
#: (its own checks and refusals apply to them there).
#: The one `include` value served: each output token's logprob (and `top_logprobs` alternatives)
#: on the message's output_text, as chat's `logprobs` gives them.
INCLUDE_LOGPROBS = "message.output_text.logprobs"
PASSED_TO_CHAT = (
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "chat_template_kwargs",
    "structured_outputs",
    "priority",
    "cache_salt",
    "request_id",
    "vllm_xargs",
    "kv_transfer_params",
)
_PASSED = frozenset(PASSED_TO_CHAT)


class ResponsesRequest(BaseModel):
    """The fields of OpenAI's Responses request and vLLM's extensions to it; anything else is
    refused by name (`extra="forbid"`), and so are the fields below that this server does not
    implement, when set (`refuse_unsupported`)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    #: OpenAI's default: a response is kept for retrieval and `previous_response_id`.
    store: bool = True
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    #: Echoed on the response, as OpenAI does; it changes nothing about the answer.
    metadata: dict[str, str] | None = None
    #: End-user ids for abuse monitoring: they change nothing about the answer.
    user: str | None = None
    safety_identifier: str | None = None
    #: A cache-routing hint: every prompt prefix is cached and routed to already (the kv router).
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    truncation: Literal["disabled", "auto"] | None = None
    stream_options: dict[str, Any] | None = None
    #: Run in a task and answer at once (queued); needs store: true, as at OpenAI.
    background: bool | None = None
    # Not implemented: refused when set (see `refuse_unsupported`).
    include: list[str] | None = None
    max_tool_calls: int | None = None
    prompt: dict[str, Any] | None = None
    conversation: str | dict[str, Any] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    prompt_cache_retention: str | None = None
    # vLLM's extensions, checked by the chat request they are passed to.
    top_k: Any = None
    min_p: Any = None
    seed: Any = None
    stop: Any = None
    stop_token_ids: Any = None
    ignore_eos: Any = None
    min_tokens: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    repetition_penalty: Any = None
    logit_bias: Any = None
    skip_special_tokens: Any = None
    include_stop_str_in_output: Any = None
    chat_template_kwargs: Any = None
    structured_outputs: Any = None
    priority: Any = None
    cache_salt: Any = None
    request_id: Any = None
    vllm_xargs: Any = None
    kv_transfer_params: Any = None

    def wants_logprobs(self) -> bool:
        return INCLUDE_LOGPROBS in (self.include or ())

    def refuse_unsupported(self) -> None:
        def refuse(field: str, what: str) -> None:
            raise RequestError(400, f"{what} is not supported by this server", param=field)

        if self.background and not self.store:
            # vLLM's words; OpenAI refuses it too.
            raise RequestError(400, "background can only be used when `store` is true", param="background")
        for value in self.include or ():
            if value != INCLUDE_LOGPROBS:
                refuse("include", f"include {value!r}")
        if self.max_tool_calls is not None:
            refuse("max_tool_calls", "max_tool_calls")
        if self.prompt is not None:
            refuse("prompt", "prompt (stored prompt templates)")
        if self.conversation is not None:
            refuse("conversation", "conversation (the Conversations API; use previous_response_id)")
        if self.top_logprobs and not self.wants_logprobs():
            # vLLM ignores it then; a field that changes nothing is refused here instead.
            refuse("top_logprobs", f"top_logprobs without include {[INCLUDE_LOGPROBS]}")
        if self.prompt_cache_retention is not None:
            refuse("prompt_cache_retention", "prompt_cache_retention")
        if self.truncation == "auto":
            refuse("truncation", "truncation 'auto'")
        if self.service_tier not in (None, "auto", "default"):
            refuse("service_tier", f"service_tier {self.service_tier!r}")
        if (self.stream_options or {}).get("include_obfuscation"):
            refuse("stream_options", "stream_options.include_obfuscation")
        for key in self.stream_options or {}:
            if key != "include_obfuscation":
                refuse("stream_options", f"stream_options.{key}")
        if self.reasoning and self.reasoning.get("summary") is not None:
            refuse("reasoning", "reasoning.summary")
        if self.reasoning and self.reasoning.get("generate_summary") is not None:
            refuse("reasoning", "reasoning.generate_summary")
        if self.text and self.text.get("verbosity") not in (None, "medium"):
            refuse("text", f"text.verbosity {self.text['verbosity']!r}")


def parse(raw: bytes) -> ResponsesRequest:
    req = bodies.parse_strict(ResponsesRequest, raw)
    req.refuse_unsupported()
    return req


# ---- input items -> chat messages ----------------------------------------------------------


def _text_parts(content: Any, where: str) -> str:
    """The text of a function call's output: a string, or a list of input_text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(400, f"{where} must be a string or a list of text parts", param="input")
    out = []
    for p in content:
        if not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text"):
            kind = p.get("type") if isinstance(p, dict) else type(p).__name__
            raise RequestError(400, f"{where}: content part {kind!r} is not supported", param="input")
        out.append(str(p.get("text", "")))
    return "".join(out)


def _content(content: Any, role: str) -> str | list[dict[str, Any]]:
    """A message item's content as chat content: text, or text and image_url parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(400, "a message's content must be a string or a list of parts", param="input")
    parts: list[dict[str, Any]] = []
    for p in content:
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": str(p.get("text", ""))})
        elif kind == "refusal" and role == "assistant":
            parts.append({"type": "text", "text": str(p.get("refusal", ""))})
        elif kind == "input_image":
            url = p.get("image_url")
            if not isinstance(url, str) or not url:
                what = "file_id images" if p.get("file_id") else "an input_image without image_url"
                raise RequestError(400, f"{what} is not supported by this server", param="input")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise RequestError(400, f"content part type {kind!r} is not supported", param="input")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _open_assistant(out: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The assistant message a reasoning, text or call item joins: the last message when it is
    an assistant turn without `key` yet (a reasoning item, its text and its calls are one turn)."""
    if out and out[-1]["role"] == "assistant" and not out[-1].get(key):
        return out[-1]
    return None


def to_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages that Responses input (or output) items mean."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, dict):
            raise RequestError(400, "input items must be objects", param="input")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise RequestError(400, f"message role {role!r} is not supported", param="input")
            content = _content(item.get("content"), role)
            joined = _open_assistant(out, "content") if role == "assistant" else None
            if joined is not None and isinstance(content, str):
                joined["content"] = content
            else:
                out.append({"role": role, "content": content})
        elif kind == "function_call":
            call: dict[str, Any] = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"},
            }
            if not isinstance(call["id"], str) or not isinstance(call["function"]["name"], str):
                raise RequestError(400, "a function_call item needs call_id and name", param="input")
            last = out[-1] if out and out[-1]["role"] == "assistant" else None
            if last is not None:
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise RequestError(400, "a function_call_output item needs call_id", param="input")
            text = _text_parts(item.get("output", ""), "function_call_output.output")
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
        elif kind == "reasoning":
            if item.get("encrypted_content"):
                raise RequestError(400, "encrypted reasoning content is not supported", param="input")
            texts = item.get("content") or item.get("summary") or []
            reasoning = "".join(str(t.get("text", "")) for t in texts if isinstance(t, dict))
            out.append({"role": "assistant", "content": None, "reasoning_content": reasoning})
        elif kind == "item_reference":
            raise RequestError(
                400, "item_reference input items are not supported; use previous_response_id", param="input"
            )
        else:
            raise RequestError(400, f"input item type {kind!r} is not supported", param="input")
    return out


# ---- tools and formats ----------------------------------------------------------------------


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for t in tools:
        if t.get("type") != "function":
            raise RequestError(
                400,
                f"tool type {t.get('type')!r} is not supported by this server; only function tools are",
                param="tools",
            )
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    kind = choice.get("type") if isinstance(choice, dict) else choice
    raise RequestError(400, f"tool_choice {kind!r} is not supported by this server", param="tool_choice")


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "description", "schema", "strict") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise RequestError(400, f"text.format type {fmt.get('type')!r} is not supported", param="text")


def _continues(items: str | list[dict[str, Any]]) -> bool:
    """Whether the input ends with an unfinished assistant message for the model to continue (as
    vLLM reads a last output message whose status is in_progress or incomplete)."""
    if isinstance(items, str) or not items:
        return False
    last = items[-1]
    return (
        (last.get("type") or "message") == "message"
        and last.get("role") == "assistant"
        and last.get("status") in ("in_progress", "incomplete")
    )


def to_chat(req: ResponsesRequest, history: list[dict[str, Any]] | None = None) -> oa.ChatRequest:
    """The chat request a Responses request means (pure). `history` is the conversation so far
    (the previous response's input and output messages); instructions do not carry over."""
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    if history:
        messages += history
    messages += to_messages(req.input)
    if not messages:
        raise RequestError(400, "input must not be empty", param="input")
    # Only the fields a request sets go in (chat's defaults stand for the rest): chat's model
    # then validates the fewest keys, once per request.
    data: dict[str, Any] = {"model": req.model, "messages": messages}
    if req.max_output_tokens is not None:
        data["max_tokens"] = req.max_output_tokens
    if req.temperature is not None:
        data["temperature"] = req.temperature
    if req.top_p is not None:
        data["top_p"] = req.top_p
    if req.stream:
        data["stream"] = True
    if req.parallel_tool_calls is not None:
        data["parallel_tool_calls"] = req.parallel_tool_calls
    if req.text:
        response_format = _response_format(req.text)
        if response_format is not None:
            data["response_format"] = response_format
    if req.reasoning and req.reasoning.get("effort") is not None:
        data["reasoning_effort"] = req.reasoning["effort"]
    if req.include and req.wants_logprobs():
        data["logprobs"], data["top_logprobs"] = True, req.top_logprobs or 0
    if _continues(req.input):
        data["continue_final_message"], data["add_generation_prompt"] = True, False
    if req.tools:
        data["tools"] = _tools(req.tools)
        choice = _tool_choice(req.tool_choice)
        if choice is not None:
            data["tool_choice"] = choice
    elif req.tool_choice not in (None, "none", "auto"):
        raise RequestError(400, "tool_choice needs tools", param="tool_choice")
    passed = _PASSED.intersection(req.model_fields_set)
    for name in PASSED_TO_CHAT if passed else ():  # (the others are None)
        if name in passed:
            value = getattr(req, name)
            if value is not None:
                data[name] = value
    return oa.validate(oa.ChatRequest, data)


def output_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as the chat messages of the next turn's history."""
    return to_messages(items)
