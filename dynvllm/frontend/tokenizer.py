"""Tokenizer and chat template from a model folder, without transformers or torch.

Reads `tokenizer.json` with the `tokenizers` library and renders the chat template with a
sandboxed Jinja environment configured as Hugging Face does, so prompts match what vLLM and
transformers produce for the same model.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any


class TokenizerError(RuntimeError):
    pass


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


#: Appended to the final message's text to find where it ends in the rendered prompt (as
#: transformers does for continue_final_message).
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


@lru_cache(maxsize=32)
def compiled(template: str) -> Any:
    """A chat template compiled in a sandboxed Jinja environment configured as Hugging Face's
    (models' templates, the server's --chat-template and trusted per-request ones)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TokenizerError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def read_chat_template(value: str) -> str:
    """A template given as vLLM's --chat-template takes it: a file's text, or the value itself when
    it is a template (it has a brace or a newline); checked by compiling it."""
    try:
        text = Path(value).read_text()
    except (OSError, ValueError):
        if not any(c in value for c in "{}\n"):
            raise ValueError(
                f"{value!r} is not a file, nor a template (a template has braces or newlines)"
            ) from None
        text = value
    from jinja2 import TemplateError

    try:
        compiled(text)
    except TemplateError as exc:
        raise ValueError(f"the chat template does not compile: {exc}") from None
    return text


def _tag_final(messages: list[dict]) -> tuple[list[dict], str]:
    """The messages with the tag after the last message's (last) text, and that text."""
    if not messages:
        raise TokenizerError("continue_final_message needs a final message to continue")
    last = dict(messages[-1])
    content = last.get("content")
    if isinstance(content, str):
        final, last["content"] = content, content + _CONTINUE_TAG
    elif isinstance(content, list) and any("text" in p for p in content):
        content = [dict(p) for p in content]
        part = next(p for p in reversed(content) if "text" in p)
        final, part["text"] = part["text"], part["text"] + _CONTINUE_TAG
        last["content"] = content
    else:
        raise TokenizerError("continue_final_message is set but the final message has no text to continue")
    return [*messages[:-1], last], final


def _cut_at_tag(text: str, final: str) -> str:
    """The prompt up to the end of the final message's text (what the template puts after it,
    such as an end-of-turn token, is cut off)."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise TokenizerError(
            "continue_final_message is set but the chat template drops part of the final message"
        )
    at = text.rindex(tag)
    if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()  # the template trimmed the message's trailing space


class Tokenizer:
    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.folder = Path(folder)
        tj = self.folder / "tokenizer.json"
        if not tj.exists():
            raise TokenizerError(f"{self.folder} has no tokenizer.json (a fast tokenizer is required)")
        self._tok = HFTokenizer.from_file(str(tj))
        cfg_path = self.folder / "tokenizer_config.json"
        self.config: dict = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.chat_template: str | None = self._load_template()
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.special_ids = set(self._tok.get_added_tokens_decoder().keys())

    def _load_template(self) -> str | None:
        jinja = self.folder / "chat_template.jinja"
        if jinja.exists():
            return jinja.read_text()
        cj = self.folder / "chat_template.json"
        if cj.exists():
            return json.loads(cj.read_text()).get("chat_template")
        tpl = self.config.get("chat_template")
        if isinstance(tpl, list):  # named templates: use the default one
            tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
        return tpl

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, tid: int) -> str:
        return self._tok.id_to_token(tid) or ""

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        template: str | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages`, with the model's chat template or `template` (one given
        to the server or with the request). With `continue_final_message` the prompt ends inside
        the last message, as transformers cuts it, so the model continues that message."""
        source = template or self.chat_template
        if not source:
            raise TokenizerError("this model has no chat template; use /v1/completions")
        final = None
        if continue_final_message:
            messages, final = _tag_final(messages)
        special = {k: _token_text(v) for k, v in self.config.items() if k.endswith("_token")}
        text = compiled(source).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special, **kwargs
        )
        return text if final is None else _cut_at_tag(text, final)

    def decode_stream(self, skip_special_tokens: bool = True) -> IncrementalText:
        return IncrementalText(self, skip_special_tokens)


class IncrementalText:
    """Text deltas for a growing token sequence (multi-byte characters held until complete)."""

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool) -> None:
        from tokenizers.decoders import DecodeStream

        self._tok = tok._tok
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tok, token_id) or ""
