"""Block keys for prompts: a hash chain over full blocks, keyed by LoRA adapter (pure).

The router never reproduces vLLM's own block hashes (their seed is private to each engine);
it maps every engine hash to its own key through the token ids carried in BlockStored events,
and hashes request prompts the same way, so both sides meet on these keys.
"""

from __future__ import annotations

from collections.abc import Sequence

ROOT = 0x5EED


def chain(
    tokens: Sequence[int], block_size: int, lora: str | None = None, parent: int | None = None
) -> list[int]:
    """Keys of each full block of `tokens`, continuing from `parent` (a prefix's last key)."""
    h = parent if parent is not None else hash((ROOT, lora))
    t = tokens if isinstance(tokens, tuple) else tuple(tokens)  # slices of a tuple are tuples
    out = []
    append = out.append
    for start in range(0, len(t) - block_size + 1, block_size):
        h = hash((h, t[start : start + block_size]))
        append(h)
    return out
