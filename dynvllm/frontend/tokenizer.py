"""Tokenizer and chat templates from a model folder, without vLLM or torch.

A fast tokenizer is read from `tokenizer.json` with the `tokenizers` library; chat prompts are
rendered as vLLM's server renders them (`templates`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dynvllm.frontend import templates


class TokenizerError(RuntimeError):
    pass


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def compiled(template: str) -> Any:
    """A chat template compiled as transformers compiles it (models' templates, the server's
    --chat-template and trusted per-request ones)."""
    return templates.compiled(template)


def read_chat_template(value: str) -> str:
    """A template given as vLLM's --chat-template takes it: a file's text, the name of one of
    vLLM's built-in templates, or the value itself when it is a template (it has a brace or a
    newline); checked by compiling it."""
    try:
        text = Path(value).read_text()
    except (OSError, ValueError):
        builtin = templates.builtin_templates_dir()
        if not any(c in value for c in "{}\n"):
            if builtin is not None and (builtin / value).is_file():
                text = (builtin / value).read_text()
            else:
                raise ValueError(
                    f"{value!r} is not a file, nor a template (a template has braces or newlines), "
                    "nor one of vLLM's built-in templates"
                ) from None
        else:
            text = value
    from jinja2 import TemplateError

    try:
        compiled(text)
    except TemplateError as exc:
        raise ValueError(f"the chat template does not compile: {exc}") from None
    return text


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


class Tokenizer:
    """A model's tokenizer and chat templates. A fast tokenizer (tokenizer.json) is read with the
    `tokenizers` library; a slow one (sentencepiece, tiktoken ...) is loaded through transformers,
    as vLLM loads it."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        tj = self.folder / "tokenizer.json"
        self.config: dict = _read_json(self.folder / "tokenizer_config.json")
        self._slow: Any = None
        if tj.exists():
            from tokenizers import Tokenizer as HFTokenizer

            self._tok = HFTokenizer.from_file(str(tj))
            # A saved tokenizer.json often keeps the truncation and padding of its trainer's last
            # call; transformers (so vLLM) sets its own on every call and never applies those.
            self._tok.no_truncation()
            self._tok.no_padding()
            self.special_ids = set(self._tok.get_added_tokens_decoder().keys())
            special = {**_read_json(self.folder / "special_tokens_map.json"), **self.config}
            self.special_tokens = {
                k: str(t) for k in templates.SPECIAL_TOKENS if (t := _token_text(special.get(k))) is not None
            }
        else:
            self._slow = self._load_slow()
            self.special_ids = set(self._slow.all_special_ids)
            self.special_tokens = dict(self._slow.special_tokens_map)
        self.templates: str | dict[str, str] | None = self._load_templates()
        self.processor_template = self._load_processor_template()
        self.model_type = _read_json(self.folder / "config.json").get("model_type")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_token = self.special_tokens.get("bos_token")
        # The renderer's import (transformers, seconds) and the template's compilation happen here,
        # where models load (off the event loop), not in a model's first request.
        if self.chat_template is not None:
            compiled(self.chat_template)

    def _load_slow(self) -> Any:
        try:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(self.folder), use_fast=False)
        except Exception as exc:
            raise TokenizerError(f"cannot load the tokenizer in {self.folder}: {exc}") from None

    def _load_templates(self) -> str | dict[str, str] | None:
        """The tokenizer's templates as transformers loads them: one, or several by name."""
        if self._slow is not None:
            return self._slow.chat_template
        named: dict[str, str] = {}
        extra = self.folder / "additional_chat_templates"
        if extra.is_dir():
            named = {f.stem: f.read_text() for f in sorted(extra.glob("*.jinja"))}
        jinja = self.folder / "chat_template.jinja"
        tpl: Any = jinja.read_text() if jinja.exists() else self.config.get("chat_template")
        if isinstance(tpl, list):
            named.update({t["name"]: t["template"] for t in tpl})
            tpl = None
        if named:
            if tpl is not None:
                named["default"] = tpl
            return named
        return tpl

    def _load_processor_template(self) -> str | None:
        """A multimodal processor's own template (vLLM prefers it for requests without tools)."""
        has_processor = any(
            (self.folder / f).exists() for f in ("processor_config.json", "preprocessor_config.json")
        )
        if not has_processor:
            return None
        jinja = self.folder / "chat_template.jinja"
        if jinja.exists():
            return jinja.read_text()
        tpl = _read_json(self.folder / "chat_template.json").get("chat_template")
        return tpl if isinstance(tpl, str) else None

    @property
    def chat_template(self) -> str | None:
        """The model's default template (the one a request without tools gets)."""
        try:
            return self.template_for(None, tools=False)
        except TokenizerError:
            return None

    def template_for(self, given: str | None, tools: bool) -> str:
        """The template a request renders with, chosen as vLLM chooses: the given one (the
        request's or the server's; a name picks one of the model's named templates), the
        processor's when the request has no tools, the tokenizer's, then vLLM's fallback for
        the model type."""
        named = self.templates if isinstance(self.templates, dict) else {}
        if given is not None:
            return named.get(given, given)
        if not tools and self.processor_template is not None:
            return self.processor_template
        if named:
            if tools and "tool_use" in named:
                return named["tool_use"]
            if "default" in named:
                return named["default"]
            raise TokenizerError(
                f"this model has several chat templates and none is the default: {sorted(named)}; "
                "choose one with --chat-template NAME"
            )
        if isinstance(self.templates, str):
            return self.templates
        fallback = templates.fallback_template(self.model_type)
        if fallback is None:
            raise TokenizerError("this model has no chat template; use /v1/completions or --chat-template")
        return fallback

    @property
    def vocab_size(self) -> int:
        if self._slow is not None:
            return len(self._slow)
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._slow is not None:
            return list(self._slow.encode(text, add_special_tokens=add_special_tokens))
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_pair(self, text: str, pair: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of a text pair as transformers' `tokenizer(text, text_pair=pair)` gives them
        (the tokenizer's pair template places the separators): vLLM's cross-encoder prompt."""
        if self._slow is not None:
            return list(self._slow(text, text_pair=pair, add_special_tokens=add_special_tokens)["input_ids"])
        if not pair:  # transformers encodes an empty pair as no pair: no second separator
            return self.encode(text, add_special_tokens)
        return self._tok.encode(text, pair, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._slow is not None:
            return str(self._slow.decode(ids, skip_special_tokens=skip_special_tokens))
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, tid: int) -> str:
        if self._slow is not None:
            return str(self._slow.convert_ids_to_tokens(tid) or "")
        return self._tok.id_to_token(tid) or ""

    def apply_chat_template(
        self, messages: list[dict[str, Any]], template: str | None = None, **kwargs: Any
    ) -> str:
        """The prompt text for OpenAI `messages` as vLLM's server renders it; `kwargs` are the
        template arguments vLLM passes (tools, add_generation_prompt, continue_final_message,
        chat_template_kwargs ...). `template` is the request's or the server's template."""
        chosen = self.template_for(template, tools=kwargs.get("tools") is not None)
        try:
            return templates.render(chosen, messages, self.special_tokens, kwargs)
        except templates.TemplateError as exc:
            raise TokenizerError(str(exc)) from None

    def decode_stream(self, skip_special_tokens: bool = True) -> IncrementalText | SlowIncrementalText:
        if self._slow is not None:
            return SlowIncrementalText(self, skip_special_tokens)
        return IncrementalText(self, skip_special_tokens)


class IncrementalText:
    """Text deltas for a growing token sequence (multi-byte characters held until complete)."""

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool) -> None:
        from tokenizers.decoders import DecodeStream

        self._tok = tok._tok
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tok, token_id) or ""


class SlowIncrementalText:
    """Text deltas for a slow tokenizer: the tokens since the last sent text are decoded with the
    ones before them (a piece's text can depend on its neighbour), and held while they end in an
    incomplete character."""

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool) -> None:
        self._tok = tok
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        done = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        now = self._tok.decode(self._ids[self._prefix :], self._skip)
        if len(now) <= len(done) or now.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return now[len(done) :]
