"""The completions endpoint's formatter: prompts as given (text or token ids, batched), choices with
text offsets in their logprobs, echo, and prompt token ids as vLLM returns them."""

from __future__ import annotations

from typing import Any

from dynvllm.frontend.models import ModelEntry
from dynvllm.frontend.openai import schema as oa
from dynvllm.frontend.openai.formatters import Formatter, Shaper, prompt_logprobs_json
from dynvllm.frontend.postprocess import ChoiceDelta
from dynvllm.frontend.request_path import Part


class _CompletionShaper(Shaper):
    def __init__(self, req: oa.CompletionRequest, parts: list[Part], n: int) -> None:
        self.req, self.parts, self.n = req, parts, n
        total = n * len(parts)
        self.texts = [""] * total
        self.finish: list[str | None] = [None] * total
        self.stop_reason: list[Any] = [None] * total
        self.lps: list[list] = [[] for _ in range(total)]
        self.echoed = [False] * total
        self.offsets = [0] * total
        self.only_echo = req.max_tokens == 0
        self.prompt_lps_sent: set[int] = set()
        self.return_ids = bool(req.return_token_ids)
        self.ids: list[list[int]] = [[] for _ in range(total)]
        self.prompt_ids_sent: set[int] = set()

    def _echo(self, index: int, part: Part) -> tuple[str, list]:
        """The prompt's text and logprob entries, once per choice, when echo is on."""
        if not self.req.echo or self.echoed[index]:
            return "", []
        self.echoed[index] = True
        post = part.post
        assert post is not None  # a generation's part always has its post-processor
        text = part.prompt_text if part.prompt_text is not None else post.tok.decode(part.prompt_ids)
        entries = post.prompt_logprob_entries(part.prompt_ids) if self.req.logprobs is not None else []
        return text, entries

    def _logprobs(self, index: int, entries: list | None) -> dict | None:
        if entries is None:
            return None
        offsets = []
        for text, _, _ in entries:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(text)
        return {
            "tokens": [t for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            # As vLLM: the entry's own token first, then the top ones (logprobs N gives up to N+1).
            "top_logprobs": [{t: lp, **dict(top)} if top is not None else None for t, lp, top in entries],
            "text_offset": offsets,
        }

    def _take(self, index: int, part: Part, d: ChoiceDelta) -> tuple[str, list | None]:
        echo_text, echo_lps = self._echo(index, part)
        text = d.text if not self.only_echo else ""
        gen_lps = (d.logprobs or []) if not self.only_echo else []
        entries = (echo_lps + gen_lps) if self.req.logprobs is not None else None
        self.texts[index] += echo_text + text
        if entries:
            self.lps[index] += entries
        if d.finish_reason:
            self.finish[index] = d.finish_reason
            self.stop_reason[index] = d.stop_reason
        return echo_text + text, entries

    def chunk(self, index: int, part: Part, d: ChoiceDelta) -> list[dict]:
        text, entries = self._take(index, part, d)
        ids = None
        if self.return_ids:
            ids = [] if self.only_echo else d.token_ids  # echo only: nothing was generated
            self.ids[index] += ids
        if not text and d.finish_reason is None and not entries and not ids:
            return []
        choice = {
            "index": index,
            "text": text,
            "logprobs": self._logprobs(index, entries),
            "finish_reason": d.finish_reason,
        }
        if d.finish_reason is not None:
            choice["stop_reason"] = d.stop_reason
        if self.req.prompt_logprobs is not None and index not in self.prompt_lps_sent:
            self.prompt_lps_sent.add(index)
            choice["prompt_logprobs"] = prompt_logprobs_json(part)
        if ids is not None:
            # As vLLM streams them: the prompt's ids with a choice's first chunk, then each
            # chunk's own.
            if index not in self.prompt_ids_sent:
                self.prompt_ids_sent.add(index)
                choice["prompt_token_ids"] = part.prompt_ids
            choice["token_ids"] = ids
        return [choice]

    def choices(self) -> list[dict]:
        out = []
        for i in range(len(self.texts)):
            self.offsets[i] = 0
            choice = {
                "index": i,
                "text": self.texts[i],
                "logprobs": self._logprobs(i, self.lps[i]) if self.req.logprobs is not None else None,
                "finish_reason": self.finish[i] or "stop",
                "stop_reason": self.stop_reason[i],
            }
            if self.req.prompt_logprobs is not None or (self.req.echo and self.req.logprobs is not None):
                # echo with logprobs asks the engine for the prompt's logprobs: vLLM returns them
                choice["prompt_logprobs"] = prompt_logprobs_json(self.parts[i // self.n])
            if self.return_ids:
                choice["prompt_token_ids"] = self.parts[i // self.n].prompt_ids
                choice["token_ids"] = self.ids[i]
            out.append(choice)
        return out


class CompletionFormatter(Formatter):
    request_model = oa.CompletionRequest
    object_name = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def prompts(self, entry: ModelEntry, req: oa.CompletionRequest) -> list[tuple[list[int], str | None]]:
        tok = entry.tokenizer
        assert tok is not None
        add_special = True if req.add_special_tokens is None else req.add_special_tokens
        out: list[tuple[list[int], str | None]] = []
        for p in req.prompts():
            out.append(
                (tok.encode(p, add_special_tokens=add_special), p) if isinstance(p, str) else (list(p), None)
            )
        return out

    def shaper(self, req: oa.CompletionRequest, parts: list[Part], n: int) -> Shaper:
        return _CompletionShaper(req, parts, n)
