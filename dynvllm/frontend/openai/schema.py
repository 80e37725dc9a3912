"""OpenAI request models and the mapping to wire sampling options (pure logic).

Rule for request fields: a field of OpenAI's or vLLM's request schema is either implemented end
to end or refused with a 400 that names it (`REFUSED`); nothing a client asks for is dropped
silently. Fields neither schema knows are ignored, as vLLM does, and logged once per name.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from dynvllm.frontend import structured
from dynvllm.frontend.bodies import from_validation, json_object, token_ids
from dynvllm.frontend.errors import RequestError

log = logging.getLogger("dynvllm.frontend")


#: Errors here are the frontend's own, surface-neutral kind; the name is kept for readers of OpenAI code.
APIError = RequestError


# Known fields dynvllm does not implement, with the values that mean "not asked for".
_UNSET: tuple[Any, ...] = (None, False, [], {}, "")
REFUSED: dict[str, tuple] = {
    "use_beam_search": _UNSET,
    "length_penalty": (*_UNSET, 1, 1.0),
    "truncate_prompt_tokens": _UNSET,
    "spaces_between_special_tokens": (None, True),
    "return_tokens_as_token_ids": _UNSET,
    "cache_salt": _UNSET,
    "kv_transfer_params": _UNSET,
    "vllm_xargs": _UNSET,
    "request_id": _UNSET,
    "mm_processor_kwargs": _UNSET,
    "documents": _UNSET,
    "functions": _UNSET,
    "function_call": _UNSET,
    "audio": _UNSET,
    "prediction": _UNSET,
    "store": _UNSET,
    "metadata": _UNSET,
    "web_search_options": _UNSET,
    "service_tier": (*_UNSET, "auto", "default"),
    "modalities": (*_UNSET, ["text"]),
    "suffix": _UNSET,
    "logprob_token_ids": _UNSET,
    "structural_tag": _UNSET,
}
_SEEN_UNKNOWN: set[str] = set()


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


class _Req(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    n: int = Field(1, ge=1, le=16)
    best_of: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int | None = Field(None, ge=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = Field(None, ge=-1, le=20)
    response_format: structured.ResponseFormat | None = None
    structured_outputs: structured.StructuredOutputs | None = None
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    add_special_tokens: bool | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None
    #: vLLM's: the prompt's and each choice's token ids on the response (`prompt_token_ids`,
    #: `token_ids`; streamed: the prompt's with the first chunk, each chunk's own ids).
    return_token_ids: bool | None = None
    #: Order in the frontend's admission queue while workers are saturated (lower goes first, as
    #: in vLLM); an x-dynvllm-priority header takes precedence.
    priority: int = Field(0, ge=-(2**31), lt=2**31)

    @model_validator(mode="after")
    def _common(self) -> _Req:
        if self.best_of not in (None, 1) and self.best_of != self.n:
            raise ValueError("best_of is not supported (it must equal n)")
        for key, value in (self.logit_bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys are token ids; got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"logit_bias values lie in [-100, 100]; got {value} for token {key}")
        return self

    def refuse_unsupported(self) -> None:
        """400 naming the first known field this server does not implement; log unknown ones."""
        for name, value in (self.model_extra or {}).items():
            if name in REFUSED:
                if value not in REFUSED[name]:
                    raise APIError(
                        400,
                        f"'{name}' is not supported by this server; remove it from the request",
                        param=name,
                    )
            elif name not in _SEEN_UNKNOWN:
                _SEEN_UNKNOWN.add(name)
                log.warning("ignoring the unknown request field %r (logged once)", name)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def top_logprobs_count(self) -> int | None:
        raise NotImplementedError

    def constraint(self) -> dict | None:
        """The structured-output constraint the request asks for (wire form), or None."""
        try:
            return structured.from_request(self)
        except structured.ConstraintError as exc:
            raise APIError(400, str(exc), param=exc.param) from None

    def sampling(self, max_tokens: int, vocab_size: int, defaults: dict[str, Any] | None = None) -> dict:
        """The wire sampling options; a field the request leaves out takes the model's default
        (`defaults`: its generation config), as `vllm serve` does."""
        bias = None
        if self.logit_bias:
            bias = []  # [[token id, bias], ...]: msgpack maps take string keys only
            for key, value in self.logit_bias.items():
                tid = int(key)
                if not 0 <= tid < vocab_size:
                    raise APIError(
                        400,
                        f"logit_bias token id {tid} is outside the vocabulary (0-{vocab_size - 1})",
                        param="logit_bias",
                    )
                bias.append([tid, value])
        d = defaults or {}
        return {
            "n": self.n,
            "max_tokens": max_tokens,
            "min_tokens": self.min_tokens,
            "temperature": _or(self.temperature, d.get("temperature")),
            "top_p": _or(self.top_p, d.get("top_p")),
            "top_k": _or(self.top_k, d.get("top_k")),
            "min_p": _or(self.min_p, d.get("min_p")),
            "seed": self.seed,
            "presence_penalty": _or(self.presence_penalty, d.get("presence_penalty")),
            "frequency_penalty": _or(self.frequency_penalty, d.get("frequency_penalty")),
            "repetition_penalty": _or(self.repetition_penalty, d.get("repetition_penalty")),
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos or None,
            "logprobs": self.top_logprobs_count(),
            "prompt_logprobs": self.prompt_logprobs,
            "logit_bias": bias,
            "allowed_token_ids": self.allowed_token_ids,
            "bad_words": self.bad_words,
            "structured_outputs": self.constraint(),
        }


def _tool_dict(tool: structured.Tool) -> dict[str, Any]:
    """A tool as vLLM gives it to chat templates (description and parameters even when null)."""
    fn = tool.function
    out: dict[str, Any] = {"name": fn.name, "description": fn.description, "parameters": fn.parameters}
    if fn.strict is not None:
        out["strict"] = fn.strict
    defer = (fn.model_extra or {}).get("defer_loading")
    if defer is not None:
        out["defer_loading"] = defer
    return {"type": "function", "function": out}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        """The text parts joined (image parts are collected by `image_urls`)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for p in self.content:
            kind = p.get("type")
            if kind == "image_url":
                continue
            if kind != "text":
                raise APIError(
                    400,
                    f"content part type {kind!r} is not supported; send text or image_url parts",
                    param="messages.content",
                )
            parts.append(str(p.get("text", "")))
        return "".join(parts)

    def image_urls(self) -> list[str]:
        if not isinstance(self.content, list):
            return []
        urls = []
        for p in self.content:
            if p.get("type") == "image_url":
                ref = p.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url:
                    raise APIError(400, "an image_url part needs {'url': ...}", param="messages.content")
                urls.append(url)
        return urls


class ChatRequest(_Req):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    tools: list[structured.Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | structured.NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    #: The last (assistant) message is left open for the model to continue, as vLLM does.
    continue_final_message: bool = False
    #: vLLM's: the last message's text before each choice's content (when its role is the
    #: response's), and the prompt's logprobs (`prompt_logprobs` = top_logprobs) on the response.
    echo: bool = False
    #: A Jinja chat template for this request (the server must trust them: --trust-request-chat-template).
    chat_template: str | None = None
    #: Given to the chat template as `reasoning_effort` (and `enable_thinking`), as vLLM does.
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    #: The request as vLLM's parsers read it, when the server runs vLLM's own parsers.
    _parser_request: Any = PrivateAttr(None)

    @model_validator(mode="after")
    def _check(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        if self.echo and self.prompt_logprobs is None:
            self.prompt_logprobs = self.top_logprobs or 0
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError(
                "continue_final_message and add_generation_prompt (true by default) are not compatible: "
                "send add_generation_prompt: false to continue the final message"
            )
        return self

    def template_arguments(self) -> dict[str, Any]:
        """The chat template's arguments as vLLM's server builds them: the tools (also under
        tool_choice "none"), chat_template_kwargs, then the request's fields over them
        (add_generation_prompt, continue_final_message, reasoning_effort and enable_thinking
        unless the client set it); a value null or "auto" is left out."""
        user = dict(self.chat_template_kwargs or {})
        if "chat_template" in user:
            raise APIError(
                400,
                "send a chat template as chat_template, not in chat_template_kwargs",
                param="chat_template_kwargs",
            )
        fields: dict[str, Any] = {
            "add_generation_prompt": self.add_generation_prompt,
            "continue_final_message": self.continue_final_message,
            "reasoning_effort": self.reasoning_effort,
        }
        if self.reasoning_effort is not None and "enable_thinking" not in user:
            fields["enable_thinking"] = self.reasoning_effort != "none"
        fields = {k: v for k, v in fields.items() if v is not None}
        out: dict[str, Any] = {}
        if self.tools is not None:
            out["tools"] = [_tool_dict(t) for t in self.tools]
        out.update({k: v for k, v in {**user, **fields}.items() if v is not None and v != "auto"})
        return out

    def wanted_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def effective_tool_choice(self) -> str | structured.NamedToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"


class CompletionRequest(_Req):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) == 0:
            raise ValueError("prompt must not be empty")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 is allowed only with echo=true")
        return self

    def wanted_max_tokens(self) -> int | None:
        if self.max_tokens == 0:
            return 1  # echo only: the engine computes the prompt's logprobs with one token
        return self.max_tokens if self.max_tokens is not None else 16

    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    def sampling(self, max_tokens: int, vocab_size: int, defaults: dict[str, Any] | None = None) -> dict:
        out = super().sampling(max_tokens, vocab_size, defaults)
        if self.echo and self.logprobs is not None and out["prompt_logprobs"] is None:
            out["prompt_logprobs"] = self.logprobs  # echoed prompt tokens carry logprobs too
        return out

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if token_ids(p):
            return [p]
        return list(p)


def parse(model: type[BaseModel], raw: bytes) -> Any:
    return validate(model, json_object(raw))


def validate(model: type[BaseModel], data: dict) -> Any:
    """A request model from a JSON object: pydantic's errors and refused fields become 400s."""
    try:
        req = model.model_validate(data)
    except ValidationError as err:
        raise from_validation(err) from None
    if isinstance(req, _Req):
        req.refuse_unsupported()
    return req
