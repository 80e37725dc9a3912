"""Sets of workers as bit masks of small worker ids, per block key: the holders table (pure).

A block's holders are one int: a lookup ANDs them along a prompt, and ingest sets a worker's bit
in many keys' masks at once. The table is a `{key: mask}` mapping with those bulk operations as
methods (`Table`), in two implementations with the same answers:

- `dynvllm.router._holders.Holders` (compiled, `_holders.c`): keys as raw 64-bit ints in one
  open-addressed array, each bulk call one C loop; no Python object per key.
- `PyHolders`: a dict, the bulk operations written as C-level passes (map, compress,
  dict.update) so that Python steps through as few keys as it can. The reference, and what runs
  where the compiled module was not built (no C compiler at install).

`DYN_ROUTER_INDEX` (read here only) picks one: `native` (the compiled table; an error if it is
not built), `python`, or `auto` (unset: the compiled table when built).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import compress, islice, repeat
from operator import is_not, not_
from typing import Any, NamedTuple, Protocol, overload

try:
    from dynvllm.router import _holders
except ImportError as exc:  # built without a C compiler, or not built yet
    _holders = None  # type: ignore[assignment]
    NATIVE_MISSING = str(exc)
else:
    NATIVE_MISSING = ""

IMPL_ENV = "DYN_ROUTER_INDEX"
Stops = list[tuple[int, int]]


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


def walk(holders: dict[int, int], keys: Sequence[int]) -> Stops:
    """(mask, depth): the workers whose prefix of `keys` ends at that depth, by depth."""
    active = holders.get(keys[0]) if keys else None
    if active is None:
        return []
    stops = []
    depth = 1
    for key in islice(keys, 1, None):
        have = holders.get(key)
        if have is None:
            break
        still = active & have
        if still != active:
            if not still:
                break
            stops.append((active ^ still, depth))
            active = still
        depth += 1
    stops.append((active, depth))
    return stops


def named(stops: Stops, workers: list[Any]) -> dict[Any, int]:
    """{workers[w]: depth} for the (mask, depth) groups of `stops`, highest w first."""
    out: dict[Any, int] = {}
    for mask, depth in stops:
        while mask:
            w = mask.bit_length() - 1
            out[workers[w]] = depth
            mask ^= 1 << w
    return out


class Table(Protocol):
    """What the index asks of a holders table (worker ids `wid`, masks as ints)."""

    def set_bit(self, wid: int, keys: list[int]) -> None: ...
    def clear_bit(self, wid: int, keys: Iterable[int]) -> list[int]: ...
    def with_bit(self, wid: int, keys: Sequence[int]) -> list[int]: ...
    def without_bit(self, wid: int, keys: Sequence[int]) -> list[int]: ...
    def stops(self, keys: Sequence[int]) -> Stops: ...
    def lookup(
        self, keys: Sequence[int], workers: list[Any], *tiers: Any
    ) -> tuple[dict[Any, int], dict[int, int]]: ...
    @overload
    def get(self, key: int, /) -> int | None: ...
    @overload
    def get(self, key: int, default: int, /) -> int: ...
    def items(self) -> Iterable[tuple[int, int]]: ...
    def values(self) -> Iterable[int]: ...
    def __getitem__(self, key: int) -> int: ...
    def __setitem__(self, key: int, mask: int) -> None: ...
    def __contains__(self, key: object) -> bool: ...
    def __iter__(self) -> Iterator[int]: ...
    def __len__(self) -> int: ...


class PyHolders(dict[int, int]):
    """The holders table as a dict (the reference implementation of `Table`)."""

    __slots__ = ()

    def set_bit(self, wid: int, keys: list[int]) -> None:
        set_bit(self, 1 << wid, keys)

    def clear_bit(self, wid: int, keys: Iterable[int]) -> list[int]:
        return clear_bit(self, 1 << wid, keys)

    def with_bit(self, wid: int, keys: Sequence[int]) -> list[int]:
        return list(compress(keys, map((1 << wid).__and__, map(self.get, keys, repeat(0)))))

    def without_bit(self, wid: int, keys: Sequence[int]) -> list[int]:
        return list(compress(keys, map(not_, map((1 << wid).__and__, map(self.get, keys, repeat(0))))))

    def stops(self, keys: Sequence[int]) -> Stops:
        return walk(self, keys)

    def lookup(
        self, keys: Sequence[int], workers: list[Any], *tiers: Any
    ) -> tuple[dict[Any, int], dict[int, int]]:
        """({workers[w]: GPU prefix}, {depth: workers that may go on below from there}): `tiers`
        alternate a lower tier's table and its deep mask (workers holding blocks there only); at
        each depth where a group stopped, its deep workers that the tier holds the block for."""
        stops = walk(self, keys)
        begin: dict[int, int] = {}
        if tiers:
            n = len(keys)
            probes = [(tiers[i].get, tiers[i + 1]) for i in range(0, len(tiers), 2)]
            for mask, depth in stops:
                if depth < n:
                    go, key = 0, keys[depth]
                    for get, deep in probes:
                        if on := mask & deep:
                            go |= get(key, 0) & on
                    if go:
                        begin[depth] = go
        return named(stops, workers), begin


def implementation(choice: str | None = None) -> str:
    """ "native" or "python": `choice`, else $DYN_ROUTER_INDEX, else the compiled table if built."""
    choice = (choice or os.environ.get(IMPL_ENV) or "auto").lower()
    if choice not in ("auto", "native", "python"):
        raise ValueError(f"{IMPL_ENV}={choice!r}: expected native, python or auto")
    if choice == "native" and _holders is None:
        raise RuntimeError(f"{IMPL_ENV}=native, but the compiled table is not built ({NATIVE_MISSING})")
    if choice == "auto":
        return "native" if _holders is not None else "python"
    return choice


class Kit(NamedTuple):
    """An implementation: its table, and its walk of a few workers through the tiers (None: the
    index walks the dicts its own way; tests/router/test_index_native.py holds the compiled walk to
    a Python reference)."""

    table: Callable[[], Table]
    walk_each: Callable[..., dict[Any, tuple[int, int, int]]] | None


def kit(impl: str) -> Kit:
    if impl == "native":
        assert _holders is not None
        return Kit(_holders.Holders, _holders.walk_each)
    return Kit(PyHolders, None)
