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
        ids = d.get("token_ids") or []
        self.usage.completion_tokens += len(ids)
        self.generated[i].extend(ids)
        stream = self.texts[i]
        emitted = matcher.feed("".join([stream.step(t) for t in ids]))
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
        lps = self._logprobs(ids, raw) if raw is not None else None
        return ChoiceDelta(i, emitted, list(ids), lps, finish, stop_reason)

    def prompt_logprob_entries(self, prompt_ids: list[int]) -> list:
        """[[token_text, logprob | None, [[top_text, logprob], ...] | None], ...] for the prompt."""
        decode = self.tok.decode
        raw = self.prompt_logprobs or [None] * len(prompt_ids)
        out: list[list[Any]] = []
        for tid, entry in zip(prompt_ids, raw, strict=False):
            text = decode([tid], skip_special_tokens=False)
            if entry is None:
                out.append([text, None, None])
            else:
                lp, top = entry
                out.append([text, lp, [[decode([t], skip_special_tokens=False), tlp] for t, tlp in top]])
        return out

    def _logprobs(self, ids: list[int], raw: list) -> list:
        decode = self.tok.decode
        return [
            [
                decode([tid], skip_special_tokens=False),
                lp,
                [[decode([t], skip_special_tokens=False), tlp] for t, tlp in top],
            ]
            for tid, (lp, top) in zip(ids, raw, strict=False)
        ]
