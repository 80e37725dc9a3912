"""`prefix-hash`: a router policy that sends every prompt sharing its first N tokens to one
worker (rendezvous hashing: a worker that leaves moves only its own prefixes).

    dynvllm serve agg --model M --workers 2 --router prefix-hash --prefix-hash-tokens 32
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from dynvllm.router.policies import Load, Pick, Policy
from dynvllm.settings import Settings
from dynvllm_example.settings import PrefixHashSettings


def owner(candidates: Sequence[str], prefix: Sequence[int]) -> str:
    """The worker a prefix belongs to: the highest hash of (worker, prefix)."""
    key = ",".join(map(str, prefix)).encode()
    return max(candidates, key=lambda c: hashlib.blake2b(c.encode() + b"|" + key, digest_size=8).digest())


class PrefixHashPolicy(Policy):
    def __init__(self, settings: Settings) -> None:
        self.tokens = settings.plugin(PrefixHashSettings).prefix_hash_tokens

    def choose(
        self, candidates: Sequence[str], tokens: Sequence[int], block_size: int, lora: str | None, load: Load
    ) -> Pick:
        return Pick(owner(candidates, list(tokens[: self.tokens])))
