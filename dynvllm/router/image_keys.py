"""Where a prompt's images sit among the tokens the engine keys (pure; the frontend's side).

The frontend holds the prompt's text tokens; the engine's processor adds each image's placeholder
tokens before it caches anything, and keys every block overlapping an image by that image too.
To predict those keys the frontend places the placeholders as the engine will, by the rule its
workers' cards state (`image_placeholder`: the placeholder token id and tokens per image):
a prompt holding that token has each occurrence stand for one image's run (LLaVA-style
templates), otherwise the images go first (BLIP-2, PaliGemma).

Without a rule (a model whose placeholder count depends on the image) the images key the whole
chain from its root: such a prompt never shares blocks with another prompt's cached text, and a
repeated one still meets the predictions its earlier routing made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dynvllm.router import hashing

_IMAGES = 0x1A6E  # tags a chain rooted in images (an int: str hashes differ per process)


@dataclass(frozen=True)
class ImagePrompt:
    tokens: list[int]
    extras: list[tuple[int, ...] | None] | None = None
    parent: int | None = None

    def keys(self, block_size: int, lora: str | None) -> list[int]:
        parent = self.parent
        if parent is not None:
            parent = hash((hashing.root(lora), parent))
        return hashing.chain(self.tokens, block_size, lora, parent, self.extras)


def place(
    ids: Sequence[int], images: Sequence[bytes], rule: Mapping[str, Any] | None, block_size: int
) -> ImagePrompt:
    hashes = [hashing.image_hash(b) for b in images]
    token = rule.get("token_id") if rule else None
    count = int(rule.get("count") or 0) if rule else 0
    if token is None or count <= 0:
        return ImagePrompt(list(ids), parent=hash((_IMAGES, *hashes)))
    tokens: list[int] = []
    placements: list[tuple[int, int, int]] = []
    pending = iter(hashes)
    if token in ids:
        for t in ids:
            h = next(pending, None) if t == token else None
            if h is None:
                tokens.append(t)
                continue
            placements.append((len(tokens), count, h))
            tokens += [token] * count
    else:
        for h in hashes:
            placements.append((len(tokens), count, h))
            tokens += [token] * count
        tokens += ids
    return ImagePrompt(tokens, hashing.placed_extras(placements, len(tokens), block_size))
