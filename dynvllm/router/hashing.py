"""Block keys for prompts: a hash chain over full blocks, keyed by LoRA adapter (pure).

The router never reproduces vLLM's own block hashes (their seed is private to each engine).
Each worker maps its engine's hashes to these keys through the token ids carried in
BlockStored events (see `block_keys`) and relays keys; the router hashes request prompts the
same way, so both sides meet on these keys. Keys must therefore be equal in every process:
CPython hashes ints and tuples of ints the same everywhere, while str (and, before 3.12, None)
hashes differ per process, so the adapter name enters as a digest.

Blocks holding image placeholder tokens also carry, as vLLM's own block hashes do, each image
that overlaps them: (image content hash, its start relative to the block). The same text with
another image is then another chain from the first image block on, the same image a shared one.
Workers have the engine name images by their content hash (`image_uuid`, passed to vLLM as
`multi_modal_uuids`), so the identifiers in its events (`extra_keys`) are the ones the frontend
computes from the image bytes (`image_hash`).
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


#: Per block: None, or the images overlapping it as a flat (hash, offset, hash, offset...) tuple.
Extras = Sequence["tuple[int, ...] | None"]


def chain(
    tokens: Sequence[int],
    block_size: int,
    lora: str | None = None,
    parent: int | None = None,
    extras: Extras | None = None,
) -> list[int]:
    """Keys of each full block of `tokens`, continuing from `parent` (a prefix's last key);
    `extras` (one entry per block, from the first) folds images into their blocks' keys."""
    h = parent if parent is not None else root(lora)
    t = tokens if isinstance(tokens, tuple) else tuple(tokens)  # slices of a tuple are tuples
    out: list[int] = []
    append = out.append
    if not extras:
        for start in range(0, len(t) - block_size + 1, block_size):
            h = hash((h, t[start : start + block_size]))
            append(h)
        return out
    for i, start in enumerate(range(0, len(t) - block_size + 1, block_size)):
        extra = extras[i] if i < len(extras) else None
        blk = t[start : start + block_size]
        h = hash((h, blk)) if extra is None else hash((h, blk, extra))
        append(h)
    return out


# ---- images ---------------------------------------------------------------------------------
def image_hash(data: bytes) -> int:
    """An image's content hash (of its encoded bytes, as the request carried them)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def image_uuid(h: int) -> str:
    """The identifier a worker gives vLLM for an image (`multi_modal_uuids`)."""
    return f"{h:016x}"


def mm_identifier(identifier: object) -> int:
    """An image identifier from an engine event as an int: ours (`image_uuid`) read back, any
    other (vLLM's own hash, when a request came without ours) as a digest. vLLM prefixes it with
    the adapter name when adapters apply to the vision tower ("name:hash")."""
    text = str(identifier).rpartition(":")[2]
    if len(text) == 16:
        try:
            return int(text, 16)
        except ValueError:
            pass
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def event_extras(extra_keys: Sequence | None) -> list[tuple[int, ...] | None] | None:
    """Per-block extras from an engine event's `extra_keys`: the (identifier, offset) pairs of
    images; adapter names and cache salts are left out (the root keys adapters; salts the
    frontend cannot see)."""
    if not extra_keys:
        return None
    out: list[tuple[int, ...] | None] = []
    found = False
    for entry in extra_keys:
        flat: list[int] = []
        for item in entry or ():
            if isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], int):
                flat += (mm_identifier(item[0]), item[1])
        if flat:
            found = True
        out.append(tuple(flat) if flat else None)
    return out if found else None


def placed_extras(
    placements: Sequence[tuple[int, int, int]], n_tokens: int, block_size: int
) -> list[tuple[int, ...] | None]:
    """Per-block extras of a prompt whose images sit at `placements` (offset, length, hash), as
    vLLM keys them: each block lists the images it overlaps, offsets relative to its start."""
    out: list[tuple[int, ...] | None] = []
    for start in range(0, n_tokens - block_size + 1, block_size):
        end = start + block_size
        flat: list[int] = []
        for offset, length, h in placements:
            if offset < end and offset + length > start:
                flat += (h, offset - start)
        out.append(tuple(flat) if flat else None)
    return out
