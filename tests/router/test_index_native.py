"""The compiled holders table (`_holders.Holders`) against the pure-Python one (`masks.PyHolders`):
the same answers for any sequence of operations, on the table and through the whole index."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynvllm.router import hashing, masks
from dynvllm.router.index import KvIndex
from dynvllm.router.tiers import CPU, DISK, GPU

pytestmark = pytest.mark.skipif(masks.NATIVE_MISSING != "", reason=f"not built: {masks.NATIVE_MISSING}")
_holders = pytest.importorskip("dynvllm.router._holders")

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
            assert _holders.run(*args, ours) == masks.run(*args, ref)
            begin = {args[2]: 1 << args[0] | 1 << 52 | 1}
            got = _holders.walk_each(args[1], begin, workers, 1, ours, ours)
            assert list(got.items()) == list(masks.walk_each(args[1], begin, workers, 1, ref, ref).items())
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


def colliding(n: int, at: int) -> list[int]:
    """`n` keys whose home slot is the same at every table size (their products with the table's
    multiplier share the top bits), as signed 64-bit ints."""
    inv = pow(0x9E3779B97F4A7C15, -1, 2**64)
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
