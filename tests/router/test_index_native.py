"""The compiled holders table (`_holders.Holders`) against the pure-Python one (`masks.PyHolders`):
the same answers for any sequence of operations, on the table and through the whole index."""

from __future__ import annotations

import copy
import gc
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynvllm.router import hashing, masks
from dynvllm.router.index import KvIndex
from dynvllm.router.masks import members
from dynvllm.router.tiers import CPU, DISK, GPU

pytestmark = pytest.mark.skipif(masks.NATIVE_MISSING != "", reason=f"not built: {masks.NATIVE_MISSING}")
_holders = pytest.importorskip("dynvllm.router._holders")


def ref_run(wid: int, keys: Sequence[int], start: int, *tables: dict[int, int]) -> int:
    """The reference for `_holders.run`: the first depth from `start` whose key none of `tables`
    has `wid` on."""
    d, n, bit = start, len(keys), 1 << wid
    gets = [table.get for table in tables]
    while d < n and any(get(keys[d], 0) & bit for get in gets):
        d += 1
    return d


def ref_walk_each(
    keys: Sequence[int], begin: dict[int, int], workers: list[Any], ncpu: int, *tables: dict[int, int]
) -> dict[Any, tuple[int, int, int]]:
    """The reference for `_holders.walk_each`: {workers[w]: (g, c, u)} for each worker w of each
    `begin[g]` (highest w first): c ends its run from g through `tables[:ncpu]`, u its run on from
    c through all `tables`."""
    out = {}
    for g, mask in begin.items():
        for w in members(mask):
            c = ref_run(w, keys, g, *tables[:ncpu])
            out[workers[w]] = (g, c, ref_run(w, keys, c, *tables))
    return out


# Worker ids in one inline window, across windows and words, and far out (1,000+ workers).
WIDS = st.sampled_from([0, 1, 2, 51, 52, 53, 63, 64, 65, 103, 104, 127, 128, 500, 1023, 1100])
# Keys as the router makes them (signed 64-bit hashes), a few of each kind so that they repeat.
KEYS = st.sampled_from([0, 1, -1, 7, 2**63 - 1, -(2**63), 12345678901234, -98765, 64, 128])
KEYLISTS = st.lists(KEYS, max_size=8)
# A lower tier's contents and its deep mask.
TIER = st.tuples(st.lists(st.tuples(WIDS, KEYLISTS), max_size=4), st.integers(0, 2**1101 - 1))
TABLE_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("set_bit"), WIDS, KEYLISTS),
        st.tuples(st.just("clear_bit"), WIDS, KEYLISTS),
        st.tuples(st.just("with_bit"), WIDS, KEYLISTS),
        st.tuples(st.just("without_bit"), WIDS, KEYLISTS),
        st.tuples(st.just("stops"), KEYLISTS),
        st.tuples(st.just("lookup"), KEYLISTS, TIER, TIER),
        st.tuples(st.just("run"), WIDS, KEYLISTS, st.integers(0, 9)),
        st.tuples(st.just("get"), KEYS),
        st.tuples(st.just("set"), KEYS, st.integers(1, 2**1101 - 1)),
        st.tuples(st.just("del"), KEYS),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(TABLE_OPS)
def test_table_operations_answer_as_the_dict_does(ops):
    native = masks.kit("native")
    ours, ref = native.table(), masks.PyHolders()
    workers = [("w", i) for i in range(1101)]
    for op, *args in ops:
        if op == "lookup":  # with two lower tiers made for the occasion
            keys, tiers = args[0], []
            for stored, deep in args[1:]:
                pair = native.table(), masks.PyHolders()
                for wid, some in stored:
                    pair[0].set_bit(wid, some)
                    pair[1].set_bit(wid, some)
                tiers.append((pair, deep))
            got = ours.lookup(keys, workers, *[x for (t, _), d in tiers for x in (t, d)])
            want = ref.lookup(keys, workers, *[x for (_, t), d in tiers for x in (t, d)])
            assert [list(got[0].items()), got[1]] == [list(want[0].items()), want[1]]
        elif op == "run":
            assert _holders.run(*args, ours) == ref_run(*args, ref)
            begin = {args[2]: 1 << args[0] | 1 << 52 | 1}
            got = _holders.walk_each(args[1], begin, workers, 1, ours, ours)
            assert list(got.items()) == list(ref_walk_each(args[1], begin, workers, 1, ref, ref).items())
        elif op in ("set", "del", "get"):
            key = args[0]
            if op == "set":
                ours[key] = ref[key] = args[1]
            elif op == "del":
                assert (key in ours) == (key in ref)
                if key in ref:
                    del ours[key], ref[key]
            assert ours.get(key) == ref.get(key) and ours.get(key, 0) == ref.get(key, 0)
        else:
            assert getattr(ours, op)(*args) == getattr(ref, op)(*args), (op, args)
        assert len(ours) == len(ref) and ours == ref and sorted(ours.items()) == sorted(ref.items())
    assert sorted(ours) == sorted(ref) and sorted(ours.values()) == sorted(ref.values())


def colliding(n: int, at: int, multiplier: int | None = None) -> list[int]:
    """`n` keys whose home slot is the same at every table size (their products with the table's
    multiplier share the top bits), as signed 64-bit ints."""
    inv = pow(multiplier or _holders.MULTIPLIER, -1, 2**64)
    keys = [(at + j) * inv % 2**64 for j in range(n)]
    return [k - 2**64 if k >= 2**63 else k for k in keys]


def test_table_grows_and_deletes_through_long_probe_runs():
    """Thousands of keys in long runs of equal home slots (one wrapping past the table's end):
    removals shift runs back without losing a key, at every table size."""
    ours, ref = masks.kit("native").table(), masks.PyHolders()
    keys = [k for at in (0, 2**62, 2**63 + 5, 2**64 - 700) for k in colliding(750, at)]
    for w, part in enumerate((keys[::3], keys[1::3], keys[2::3], keys)):
        ours.set_bit(w * 40, part)
        ref.set_bit(w * 40, part)
    assert ours == ref and len(ours) == len(set(keys))
    for w, part in enumerate((keys[::2], keys[1::4], keys)):
        assert ours.clear_bit(w * 40 + 40, part) == ref.clear_bit(w * 40 + 40, part)
        assert ours == ref and all(k in ours for k in ref)
    for w in (0, 40, 80):
        assert ours.clear_bit(w, keys) == ref.clear_bit(w, keys)
    assert len(ours) == len(ref) == 0 and ours.items() == []
    with pytest.raises(OverflowError):
        ours.set_bit(0, [2**64])
    with pytest.raises(ValueError):
        ours[1] = 0


BS = 4
WORKERS = [(f"w{i}", i % 2) for i in range(70)]  # 70 workers, ids in this order
BUSY = [0, 5, 51, 52, 53, 63, 64, 69]  # the ones events come from: masks within and past one word
# Six prompts of 6 blocks, in pairs that share their first 4, 2 and 1 blocks.
PROMPTS = [
    [1] * 16 + [2] * 8,
    [1] * 16 + [3] * 8,
    [4] * 8 + [5] * 16,
    [4] * 8 + [6] * 16,
    [7] * 24,
    [7] * 4 + [8] * 20,
]
PROMPT_KEYS = [hashing.chain(p, BS) for p in PROMPTS]
EVENTS = st.lists(  # a run of a prompt's blocks, as engines store and evict them
    st.tuples(
        st.sampled_from(
            ["stored", "stored", "stored", "removed", "removed", "predict", "expire", "cleared", "drop"]
        ),
        st.sampled_from(BUSY),
        st.sampled_from([GPU, GPU, CPU, DISK]),
        st.integers(0, len(PROMPTS) - 1),
        st.integers(0, 5),
        st.integers(1, 6),
    ),
    max_size=120,
)


def answers(index: KvIndex) -> dict[str, object]:
    return {
        "overlaps": [list(index.overlaps(ks).items()) for ks in PROMPT_KEYS],
        "further": sum(bool(index.lookup(ks)[1]) for ks in PROMPT_KEYS),
        "lookup": [index.lookup(ks) for ks in PROMPT_KEYS],
        "tiered": [index.tiered(ks) for ks in PROMPT_KEYS],
        "counts": [index.tier_block_count(t) for t in (GPU, CPU, DISK)],
        "confirmed": sorted((w, sorted(ks)) for w, ks in index.confirmed()),
        "lower": sorted((t, w, sorted(ks)) for t, w, ks in index.confirmed_lower()),
        "holders": sorted(index.holders.items()),
    }


@settings(max_examples=120, deadline=None)
@given(EVENTS, st.sampled_from([2, 6, 40]))
def test_the_index_answers_the_same_on_either_table(events, step):
    """Random event sequences (stores and removals in every tier, predictions that expire,
    cleared caches, dropped workers; worker ids up to 69) through an index on each table: every
    answer the router reads is equal, compared every `step` events and at the end."""
    ours, ref = KvIndex("native"), KvIndex("python")
    assert ours.impl == "native" and ref.impl == "python"
    for index in (ours, ref):
        for worker in WORKERS:
            index.predict(worker, [], 1.0, 0.0)  # (ids given out in order)
    now = 0.0
    for i, (kind, w, tier, p, at, n) in enumerate(events):
        worker, some = WORKERS[w], PROMPT_KEYS[p][at : at + n]
        for index in (ours, ref):
            if kind in ("stored", "removed"):
                index.apply(worker, (kind, list(some)) if tier == GPU else (kind, list(some), tier))
            elif kind == "predict":
                index.predict(worker, list(some), 1.0, now)
            elif kind == "expire":
                index.expire(now + 1.5)
            elif kind == "cleared":
                index.apply(worker, ("cleared",))
            else:
                index.drop_instance(worker[0])
        now += 1.5 if kind == "expire" else 0.0
        if i % step == 0:
            assert answers(ours) == answers(ref)
    assert answers(ours) == answers(ref)


class _Key:
    """A key that is not an int: its conversion would change the list it came in."""

    def __init__(self, keys: list, value: int) -> None:
        self.keys, self.value = keys, value

    def __index__(self) -> int:
        self.keys.clear()  # frees the list's item array and the ints in it
        self.keys.extend(range(10**6, 10**6 + 5000))
        return self.value


@pytest.mark.parametrize("call", ["set_bit", "clear_bit", "with_bit", "without_bit", "stops", "lookup"])
def test_a_key_that_is_not_an_int_is_refused_before_it_can_change_the_keys(call):
    """Only ints are keys: converting another object runs its code, which could change the list
    being read (the table read freed memory: wrong keys stored, or a crash)."""
    ours = masks.kit("native").table()
    ours.set_bit(0, [1, 2])
    keys: list = [2**40 + i for i in range(3000)]
    keys.insert(1, _Key(keys, 1))
    args = (keys, [("w", 0)]) if call == "lookup" else (keys,) if call == "stops" else (0, keys)
    with pytest.raises(TypeError, match="a block key is an int, not _Key"):
        getattr(ours, call)(*args)
    assert len(keys) == 3001 and sorted(ours.items()) == [(1, 1), (2, 1)]


class _Worker:
    """A worker whose hash shortens the list of workers it is named from."""

    def __init__(self, workers: list, i: int) -> None:
        self.workers, self.i = workers, i

    def __hash__(self) -> int:
        self.workers.clear()
        return self.i


def test_workers_that_change_their_list_while_named_raise():
    """A lookup names workers by their ids in the list it is given; hashing one may run code
    that shortens that list: the next id past it is an IndexError (it read past the list)."""
    ours = masks.kit("native").table()
    ours.set_bit(0, [1])
    ours.set_bit(5, [1])
    workers: list = []
    workers += [_Worker(workers, i) for i in range(6)]
    with pytest.raises(IndexError, match="a worker id past the workers"):
        ours.lookup([1, 2], workers)
    workers += [_Worker(workers, i) for i in range(6)]
    with pytest.raises(IndexError, match="a worker id past the workers"):
        _holders.walk_each([1, 2], {0: 0b100001}, workers, 1, ours)


def test_a_table_changed_by_a_finalizer_while_listed_raises():
    """Listing pairs allocates tuples, which may run the collector (before 3.12; later ones
    collect between bytecodes) and so a finalizer: one that grows the table mid-listing is a
    RuntimeError, as in a dict's iteration (the listing wrote past its list)."""
    ours = masks.kit("native").table()
    ours.set_bit(0, list(range(2000)))

    class Grows:
        def __del__(self) -> None:
            ours.set_bit(1, list(range(10**6, 10**6 + 20000)))

    threshold = gc.get_threshold()
    gc.collect()
    gc.set_threshold(1)
    try:
        cycle = Grows()
        cycle.me = cycle
        del cycle  # freed by the collector, from whatever allocation comes next
        try:
            items = ours.items()
        except RuntimeError as exc:
            assert "changed size during iteration" in str(exc)
        else:
            assert len(items) in (2000, 22000) and len(set(items)) == len(items)
    finally:
        gc.set_threshold(*threshold)
        gc.collect()
    assert len(ours) == 22000 and len(ours.items()) == 22000


NOT_INTS = [(1.0, TypeError), ("1", TypeError), (None, TypeError)]
BAD_KEYS = [(2**63, OverflowError), (-(2**63) - 1, OverflowError), *NOT_INTS]
BAD_WIDS = [(-1, ValueError), (2**63, OverflowError), *NOT_INTS]
KEY_CALLS = [  # each call with one bad key among good ones
    lambda t, key: t.set_bit(0, [5, key]),
    lambda t, key: t.clear_bit(3, [1, key]),
    lambda t, key: t.without_bit(0, [key]),
    lambda t, key: t.lookup([1, key], [("w", 3)] * 4),
    lambda t, key: t.get(key),
    lambda t, key: t[key],
    lambda t, key: key in t,
    lambda t, key: t.__setitem__(key, 1),
    lambda t, key: _holders.run(3, [1, key], 0, t),
]


def test_wrong_arguments_raise():
    """Bad keys, worker ids, masks and arguments from Python raise, leaving the table as it was."""
    ours = masks.kit("native").table()
    ours.set_bit(3, [1, 2])
    for key, error in BAD_KEYS:
        for call in KEY_CALLS:
            with pytest.raises(error):
                call(ours, key)
    for wid, error in BAD_WIDS:
        with pytest.raises(error):
            ours.set_bit(wid, [7])
        with pytest.raises(error):
            ours.clear_bit(wid, [1])
    for mask in (0, -1, 1.0, "1", None):
        with pytest.raises(ValueError):
            ours[9] = mask
        with pytest.raises(ValueError):
            ours.lookup([1, 2], [("w", 3)] * 4, masks.kit("native").table(), mask or -1)
    for args in [(), (0,), (0, 5), (0, None), (0, [1], 2)]:
        with pytest.raises(TypeError):
            ours.set_bit(*args)
    with pytest.raises(TypeError):
        ours.lookup([1], [], {}, 1)  # a tier's table that is not a Holders
    with pytest.raises(TypeError):
        _holders.walk_each([1], {0: 8}, [], 1, {})
    with pytest.raises(ValueError):
        _holders.walk_each([1], {-1: 8}, [("w", 3)] * 4, 1, ours)
    with pytest.raises(IndexError):
        ours.lookup([1, 2], [("w", 0)])  # worker 3 is past the list
    with pytest.raises(TypeError):  # no copy or pickle: it would not be the index's table
        copy.copy(ours)
    assert sorted(ours.items()) == [(1, 8), (2, 8)] and 9 not in ours


@pytest.mark.parametrize("far", [4095, 65535, 200_000])
def test_thousands_of_workers(far):
    """Worker ids past the inline windows (wide masks of up to thousands of words) answer as
    the dict does."""
    ours, ref = masks.kit("native").table(), masks.PyHolders()
    wids = [0, 1, 51, 52, 1100, far // 2, far - 1, far]
    for i, wid in enumerate(wids):
        for table in (ours, ref):
            table.set_bit(wid, list(range(i, 40)))
            table.set_bit(wid, [100 + wid])
    assert ours == ref
    workers = [("w", i) for i in range(far + 1)]
    deep = 1 << far | 1 << (far // 2) | 1
    for table in (ours, ref):
        table.set_bit(far, [40, 41])
    keys = list(range(45))
    assert ours.stops(keys) == ref.stops(keys)
    assert ours.lookup(keys, workers, ours, deep) == ref.lookup(keys, workers, ref, deep)
    for wid in wids:
        assert ours.clear_bit(wid, list(range(0, 40, 3))) == ref.clear_bit(wid, list(range(0, 40, 3)))
    assert ours == ref and ours.stops(keys) == ref.stops(keys)


@pytest.mark.parametrize("wids", [list(range(60)), [w * 37 for w in range(60)]])
def test_a_walk_that_stops_at_every_key(wids):
    """As many stops as the first key has workers (one drops out at each key), in one window and
    spread over words: the walk keeps room for exactly that many."""
    ours, ref = masks.kit("native").table(), masks.PyHolders()
    keys = list(range(len(wids) + 5))
    for i, wid in enumerate(wids):
        for table in (ours, ref):
            table.set_bit(wid, keys[: i + 1])
    for some in (keys, keys[: len(wids)], keys[:1], keys[:2]):
        assert ours.stops(some) == ref.stops(some)
    assert len(ours.stops(keys)) == len(wids)
    workers = [("w", i) for i in range(max(wids) + 1)]
    assert list(ours.lookup(keys, workers)[0].items()) == list(ref.lookup(keys, workers)[0].items())


def test_keys_aimed_at_one_home_slot_under_another_multiplier_spread_out():
    """The home slot's multiplier is a secret drawn per process: keys crafted to share a home
    slot under a multiplier known in advance (here the one this module used to have) land
    spread out: 20,000 of them go in about as fast as random keys (with the multiplier fixed they
    took some 450 times as long, each insert walking the whole run). Each process has its own."""
    import subprocess
    import sys
    import time

    assert _holders.MULTIPLIER % 2 == 1
    other = subprocess.run(
        [sys.executable, "-c", "from dynvllm.router import _holders; print(_holders.MULTIPLIER)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(other.stdout) != _holders.MULTIPLIER
    aimed = colliding(20_000, 12345 << 40, 0x9E3779B97F4A7C15)
    spread = [k * 0x2545F4914F6CDD1D % 2**63 for k in range(1, 20_001)]
    took = []
    for keys in (spread, aimed):
        ours = masks.kit("native").table()
        ours.set_bit(0, list(range(-500_000, 0)))
        start = time.perf_counter()
        ours.set_bit(1, keys)
        took.append(time.perf_counter() - start)
        assert len(ours) == 520_000 and ours.with_bit(1, keys) == keys
    assert took[1] < 10 * took[0] + 0.005, took
