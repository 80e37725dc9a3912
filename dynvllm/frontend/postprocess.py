"""Post-processing of one request's token stream: detokenize, stop strings, logprobs, usage.

Pure: wire deltas in, `ChoiceDelta`s out, no I/O and no clock. Its state (text so far, stop
matcher, usage) belongs to the request, not to a worker, so it carries on unchanged when the
dispatcher moves the request to another worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dynvllm.frontend.stops import StopMatcher
from dynvllm.frontend.tokenizer import Tokenizer
from dynvllm.runtime.errors import BadRequest


@dataclass
class ChoiceDelta:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None  # [[token_text, logprob, [[top_text, top_logprob], ...]], ...]
    finish_reason: str | None = None
    #: What stopped the choice: the matched stop string, a stop token id, or None (EOS, length).
    stop_reason: str | int | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class PostProcessor:
    def __init__(
        self,
        tokenizer: Tokenizer,
        n: int,
        prompt_tokens: int,
        stops: list[str],
        include_stop: bool = False,
        skip_special: bool = True,
    ) -> None:
        self.tok = tokenizer
        self.n = n
        self.stops = [StopMatcher(stops, include_stop) for _ in range(n)]
        self.texts = [tokenizer.decode_stream(skip_special) for _ in range(n)]
        self.usage = Usage(prompt_tokens=prompt_tokens)
        #: Whether the first worker's prompt count came (a migrated stream's later workers see
        #: the prompt plus the tokens generated so far: only the first counts).
        self._engine_prompt = False
        self.finished = [False] * n
        #: Token ids generated so far for each choice (what a new worker must continue from).
        self.generated: list[list[int]] = [[] for _ in range(n)]
        #: The engine's prompt logprobs, when asked for: [None | [logprob, [[id, logprob], ...]], ...].
        self.prompt_logprobs: list | None = None

    @property
    def done(self) -> bool:
        return all(self.finished)

    def feed(self, d: dict[str, Any]) -> ChoiceDelta | None:
        """The client-visible delta for one wire delta, or None when a stopped choice sends more."""
        if "prompt_tokens" in d:
            self.usage.cached_tokens = int(d.get("cached_tokens") or 0)
            if not self._engine_prompt:
                # The engine's processor adds tokens the frontend never sees (an image's
                # placeholders): its count is the prompt's, as vLLM's server reports it.
                self._engine_prompt = True
                self.usage.prompt_tokens = max(self.usage.prompt_tokens, int(d["prompt_tokens"] or 0))
            if "prompt_logprobs" in d:
                self.prompt_logprobs = d["prompt_logprobs"]
        i = int(d.get("index", 0))
        if not 0 <= i < self.n:
            raise BadRequest(f"worker sent choice {i} of {self.n}")
        matcher = self.stops[i]
        if matcher.matched is not None:
            return None
        ids = list(d.get("token_ids") or [])
        stream = self.texts[i]
        emitted = ""
        for k, t in enumerate(ids):
            emitted += matcher.feed(stream.step(t))
            if matcher.matched is not None:
                # Tokens the engine made past a stop string in the same delta are not part of the
                # output: vLLM's count and token ids end with the token that completed the match.
                del ids[k + 1 :]
                break
        self.usage.completion_tokens += len(ids)
        context = self.generated[i][-_CONTEXT:]
        self.generated[i].extend(ids)
        finish = d.get("finish_reason")
        stop_reason = None
        if matcher.matched is not None:
            finish, stop_reason = "stop", matcher.matched
        elif finish is not None:
            emitted += matcher.flush()
            finish = "stop" if finish == "abort" else finish
            stop_reason = d.get("stop_reason")
        if finish is not None:
            self.finished[i] = True
        raw = d.get("logprobs")
        lps = self._logprobs(ids, raw, context) if raw is not None else None
        return ChoiceDelta(i, emitted, ids, lps, finish, stop_reason)

    def prompt_logprob_entries(self, prompt_ids: list[int]) -> list:
        """[[token_text, logprob | None, [[top_text, logprob], ...] | None], ...] for the prompt."""
        raw = self.prompt_logprobs or [None] * len(prompt_ids)
        out: list[list[Any]] = []
        context: list[int] = []  # as vLLM: the prompt tokens before, the first one left out
        for tid, entry in zip(prompt_ids, raw, strict=False):
            if entry is None:
                out.append([token_text(self.tok, tid, []), None, None])
            else:
                lp, top = entry
                ctx = context[-_CONTEXT:]
                tops = [[token_text(self.tok, t, ctx), tlp] for t, tlp in top]
                out.append([token_text(self.tok, tid, ctx), lp, tops])
                context.append(tid)
        return out

    def _logprobs(self, ids: list[int], raw: list, context: list[int]) -> list:
        out = []
        context = list(context)
        for tid, (lp, top) in zip(ids, raw, strict=False):
            ctx = context[-_CONTEXT:]
            tops = [[token_text(self.tok, t, ctx), tlp] for t, tlp in top]
            out.append([token_text(self.tok, tid, ctx), lp, tops])
            context.append(tid)
        return out


#: How many sampled tokens before a logprob entry vLLM reads to finish its UTF-8 character.
_CONTEXT = 4


def token_text(tok: Tokenizer, tid: int, context: list[int]) -> str:
    """A logprob entry's token text as vLLM's engine gives it: the token decoded alone, unless
    that ends in U+FFFD (one byte of a character split across tokens); then the text the token
    adds after up to 4 tokens before it, or "" while the character is still incomplete."""
    text = tok.decode([tid], skip_special_tokens=False)
    if not text.endswith("\ufffd"):
        return text
    for n in range(1, len(context) + 1):
        ctx = context[-n:]
        full = tok.decode([*ctx, tid], skip_special_tokens=False)
        if full.endswith("\ufffd"):
            continue
        clean = len(ctx)
        while clean > 0 and tok.decode([ctx[clean - 1]], skip_special_tokens=False).endswith("\ufffd"):
            clean -= 1
        prefix = tok.decode(ctx[:clean], skip_special_tokens=False) if clean else ""
        if full.startswith(prefix):
            return full[len(prefix) :]
        common = 0
        for a, b in zip(prefix, full, strict=False):
            if a != b:
                break
            common += 1
        return full[common:]
    return ""
