"""Sets of workers as bit masks of small worker ids, per block key (pure).

A block's holders are one int: a lookup ANDs them along a prompt, and ingest sets a worker's bit
in many keys' masks at once. These are the bulk operations on a `{key: mask}` dict, written as
C-level passes (map, compress, dict.update) so that Python steps through as few keys as it can.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import compress, islice, repeat
from operator import is_not


def members(mask: int) -> list[int]:
    """The worker ids in `mask` (highest first): a bit at a time, which beats any conversion of
    the whole mask for the few to hundreds of workers a lookup names."""
    out = []
    while mask:
        w = mask.bit_length() - 1
        out.append(w)
        mask ^= 1 << w
    return out


def set_bit(holders: dict[int, int], bit: int, keys: Iterable[int]) -> None:
    """Add `bit` to the masks of `keys` in C-level passes: new keys take `bit` itself
    (setdefault); only if some were held already (the dict grew by fewer than `keys`), those
    are found and ORed. Keys chain, so the ones other workers hold come first in a store: when
    every key after the first `bit` got just `bit`, only those first ones are ORed."""
    keys = keys if isinstance(keys, list) else list(keys)
    size = len(holders)
    haves = list(map(holders.setdefault, keys, repeat(bit)))
    n = len(keys)
    if len(holders) - size == n:
        return
    try:
        lead = haves.index(bit)
    except ValueError:
        lead = n
    if haves.count(bit) == n - lead:  # [lead:] all bit-only, [:lead] none: OR the lead alone
        holders.update(zip(islice(keys, lead), map(bit.__or__, islice(haves, lead)), strict=True))
        return
    old = list(map(is_not, haves, repeat(bit)))
    holders.update(zip(compress(keys, old), map(bit.__or__, compress(haves, old)), strict=True))


def clear_bit(holders: dict[int, int], bit: int, keys: Iterable[int]) -> list[int]:
    """Take `bit` out of the masks of `keys` (a key left with no holder goes); the keys that had it."""
    gone = []
    for key in keys:
        have = holders.get(key)
        if have is not None and have & bit:
            if have == bit:
                del holders[key]
            else:
                holders[key] = have ^ bit
            gone.append(key)
    return gone
