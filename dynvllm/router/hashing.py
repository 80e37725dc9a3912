"""Block keys for prompts: a hash chain over full blocks, keyed by LoRA adapter (pure).

The router never reproduces vLLM's own block hashes (their seed is private to each engine).
Each worker maps its engine's hashes to these keys through the token ids carried in
BlockStored events (see `block_keys`) and relays keys; the router hashes request prompts the
same way, so both sides meet on these keys. Keys must therefore be equal in every process:
CPython hashes ints and tuples of ints the same everywhere, while str (and, before 3.12, None)
hashes differ per process, so the adapter name enters as a digest.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

ROOT = 0x5EED


@functools.lru_cache(maxsize=4096)
def root(lora: str | None) -> int:
    """The key a chain starts from: one per adapter (None: the base model)."""
    if lora is None:
        return hash((ROOT, 0))
    digest = hashlib.blake2b(lora.encode(), digest_size=8).digest()
    return hash((ROOT, int.from_bytes(digest, "big")))


def chain(
    tokens: Sequence[int], block_size: int, lora: str | None = None, parent: int | None = None
) -> list[int]:
    """Keys of each full block of `tokens`, continuing from `parent` (a prefix's last key)."""
    h = parent if parent is not None else root(lora)
    t = tokens if isinstance(tokens, tuple) else tuple(tokens)  # slices of a tuple are tuples
    out: list[int] = []
    append = out.append
    for start in range(0, len(t) - block_size + 1, block_size):
        h = hash((h, t[start : start + block_size]))
        append(h)
    return out
