"""The KV index and cost function against brute-force oracles (property-based)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynvllm.router import hashing, masks
from dynvllm.router.block_keys import BlockKeys
from dynvllm.router.index import KvIndex
from dynvllm.router.kv_events import decode_batch
from dynvllm.router.kv_policy import KvPolicy

BS = 4
WORKERS = [("a", 0), ("b", 0), ("c", 0)]


@pytest.fixture(scope="module", autouse=True, params=["native", "python"])
def table(request):
    """Every test here runs on each holders table (`masks`): the compiled one and the dict."""
    if request.param == "native" and masks.NATIVE_MISSING:
        pytest.skip(f"compiled holders table not built: {masks.NATIVE_MISSING}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(masks.IMPL_ENV, request.param)
        yield request.param


prompts = st.lists(st.integers(0, 2), min_size=BS, max_size=BS * 5)
ops = st.lists(
    st.tuples(
        st.sampled_from(["store", "store", "store", "remove", "clear", "drop"]),
        st.sampled_from(WORKERS),
        prompts,
        st.integers(0, 100),
    ),
    max_size=40,
)


class Engine:
    """What one engine would report: engine hashes private to it, parents referenced by hash;
    `keyed` is what its worker relays (the engine events through the worker's BlockKeys)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.blocks: dict[tuple, int] = {}  # token prefix (full blocks) -> engine hash
        self.keys = BlockKeys()

    def keyed(self, event: tuple | None) -> tuple | None:
        return None if event is None else self.keys.translate(event)

    def ehash(self, prefix: tuple) -> int:
        return hash((self.name, "engine", prefix)) & ((1 << 63) - 1)

    def store(self, tokens: list[int]) -> tuple | None:
        n = len(tokens) // BS
        prefixes = [tuple(tokens[: (i + 1) * BS]) for i in range(n)]
        first_new = next((i for i, p in enumerate(prefixes) if p not in self.blocks), None)
        if first_new is None:
            return None
        # vLLM stores a prompt's blocks in order; evicted ancestors come back before children.
        new = prefixes[first_new:]
        for p in new:
            self.blocks[p] = self.ehash(p)
        parent = self.blocks[prefixes[first_new - 1]] if first_new > 0 else None
        return (
            "stored",
            [self.blocks[p] for p in new],
            parent,
            list(tokens[first_new * BS : n * BS]),
            BS,
            None,
        )


def oracle_overlap(held: set[tuple], tokens: list[int]) -> int:
    n = 0
    for i in range(len(tokens) // BS):
        if tuple(tokens[: (i + 1) * BS]) in held:
            n += 1
        else:
            break
    return n


@settings(max_examples=150, deadline=None)
@given(ops, st.lists(prompts, min_size=1, max_size=5))
def test_overlaps_match_oracle(operations, queries):
    index = KvIndex()
    engines = {w: Engine(w[0]) for w in WORKERS}
    for op, w, tokens, pick in operations:
        eng = engines[w]
        if op == "store":
            ev = eng.keyed(eng.store(tokens))
            if ev:
                index.apply(w, ev)
        elif op == "remove" and eng.blocks:
            # Evict a leaf (no stored child), as an LRU block pool does.
            leaves = [
                p for p in eng.blocks if not any(q[: len(p)] == p and len(q) > len(p) for q in eng.blocks)
            ]
            victim = sorted(leaves)[pick % len(leaves)]
            ev = eng.keyed(("removed", [eng.blocks.pop(victim)]))
            if ev:
                index.apply(w, ev)
        elif op == "clear":
            eng.blocks.clear()
            index.apply(w, eng.keyed(("cleared",)))
        elif op == "drop":  # the router dropped the worker (a relay gap); the worker's map stays
            eng.blocks.clear()
            eng.keys = BlockKeys()
            index.drop_worker(w)
    for q in queries:
        got = index.overlaps(hashing.chain(q, BS))
        for w in WORKERS:
            want = oracle_overlap(set(engines[w].blocks), q)
            assert got.get(w, 0) == want, (w, q)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(prompts, min_size=1, max_size=6),
    prompts,
    st.dictionaries(st.sampled_from(WORKERS), st.integers(0, 20)),
    st.floats(0, 4),
)
def test_choice_is_the_brute_force_minimum(stored, query, load, weight):
    index = KvIndex()
    engines = {w: Engine(w[0]) for w in WORKERS}
    for i, tokens in enumerate(stored):
        w = WORKERS[i % len(WORKERS)]
        ev = engines[w].keyed(engines[w].store(tokens))
        if ev:
            index.apply(w, ev)
    keys = hashing.chain(query, BS)
    decision = KvPolicy(index, prefill_weight=weight).choose(
        WORKERS, keys, {k[0]: float(v) for k, v in load.items()}
    )
    brute = {
        w: (weight + 1) * (len(keys) - oracle_overlap(set(engines[w].blocks), query)) + load.get(w, 0)
        for w in WORKERS
    }
    assert abs(decision.cost - min(brute.values())) < 1e-9
    assert abs(brute[decision.worker] - min(brute.values())) < 1e-9


def test_lora_keys_differ_and_expiry_forgets_predictions():
    tokens = list(range(8))
    assert hashing.chain(tokens, BS, "a") != hashing.chain(tokens, BS, None)
    index = KvIndex()
    index.predict(("x", 0), hashing.chain(tokens, BS), ttl=10, now=0)
    assert index.overlaps(hashing.chain(tokens, BS)) == {("x", 0): 2}
    index.expire(now=11)
    assert index.overlaps(hashing.chain(tokens, BS)) == {}
    assert index.block_count() == 0


def test_decode_both_encodings():
    new = msgpack.packb(
        [
            1.0,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [11, 12],
                    "parent_block_hash": None,
                    "token_ids": list(range(8)),
                    "block_size": 4,
                    "lora_name": None,
                    "medium": "GPU",
                },
                {"type": "BlockRemoved", "block_hashes": [12], "medium": "GPU"},
                {"type": "AllBlocksCleared"},
            ],
            0,
        ]
    )
    old = msgpack.packb(
        [
            1.0,
            [
                ["BlockStored", [11, 12], None, list(range(8)), 4, None, "GPU"],
                ["BlockRemoved", [12], "GPU"],
                ["AllBlocksCleared"],
            ],
            0,
        ]
    )
    for payload in (new, old):
        dp, events = decode_batch(payload)
        assert dp == 0
        assert events == [
            ("stored", [11, 12], None, list(range(8)), 4, None, "GPU", None),
            ("removed", [12], "GPU"),
            ("cleared",),
        ]


def test_predictions_expire_unless_confirmed_or_refreshed():
    index = KvIndex()
    a, b = hashing.chain(list(range(8)), BS), hashing.chain(list(range(100, 108)), BS)
    w = ("x", 0)
    index.predict(w, a, ttl=10, now=0)
    index.predict(w, b, ttl=10, now=1)
    index.apply(w, ("stored", a[:1]))  # the worker's events confirm the first block of `a`
    index.predict(w, b, ttl=10, now=5)  # `b` routed again: its prediction runs to 15
    index.expire(now=12)
    assert index.overlaps(a) == {w: 1}  # the confirmed block stays, the predicted one went
    assert index.overlaps(b) == {w: 2}
    index.expire(now=16)
    assert index.overlaps(b) == {}
    index.apply(w, ("removed", a[:1]))
    assert index.block_count() == 0


def test_worker_logs_compact_and_keep_answering_as_the_events_say(monkeypatch):
    """A worker's GPU blocks are kept as the event lists they came in, compacted as they grow:
    through any sequence of stores, removals, predictions (expired, confirmed, retracted),
    cleared caches and drops, holders, counts and snapshots match a per-worker model, and a
    log stays within a bound of what its worker holds."""
    import random

    from dynvllm.router import key_log

    monkeypatch.setattr(key_log, "LOG_MIN", 4)
    rng = random.Random(3)
    keys = hashing.chain(list(range(24 * BS)), BS)
    for _ in range(20):
        index = KvIndex()
        events: dict[tuple[str, int], set[int]] = {w: set() for w in WORKERS}
        predicted: dict[tuple[str, int], dict[int, float]] = {w: {} for w in WORKERS}
        now, made = 0.0, []
        for _ in range(300):
            w, op = rng.choice(WORKERS), rng.random()
            a = rng.randrange(len(keys))
            some = keys[a : a + rng.randrange(1, 7)]
            if op < 0.45:
                index.apply(w, ("stored", list(some)))
                events[w].update(some)
                for k in some:
                    predicted[w].pop(k, None)
            elif op < 0.75:
                index.apply(w, ("removed", list(some)))
                events[w].difference_update(some)
                for k in some:
                    predicted[w].pop(k, None)
            elif op < 0.85:
                index.predict(w, some, 1.0, now)
                made.append((w, some, now + 1.0))
                for k in some:
                    if k not in events[w]:
                        predicted[w][k] = now + 1.0
            elif op < 0.9:
                now += rng.choice((0.5, 1.0))
                index.expire(now)
                for v in WORKERS:
                    predicted[v] = {k: e for k, e in predicted[v].items() if e > now}
            elif op < 0.93 and made:
                v, ks, expiry = rng.choice(made)
                index.retract(v, ks, expiry)
                for k in ks:
                    if predicted[v].get(k) == expiry:
                        del predicted[v][k]
            elif op < 0.97:
                index.apply(w, ("cleared",))
                events[w].clear()
                predicted[w].clear()
            else:
                index.drop_worker(w)
                events[w].clear()
                predicted[w].clear()
            for k in keys:
                want = {v: 1 for v in WORKERS if k in events[v] or k in predicted[v]}
                assert index.overlaps([k]) == want
            assert index.block_count() == sum(len(events[v] | predicted[v].keys()) for v in WORKERS)
            for log in index._logs.values():
                assert sum(len(x) for x in log.lists) <= 4 * len(keys) + 6
        got = {v: set(ks) for v, ks in index.confirmed() if ks}
        assert got == {v: events[v] for v in WORKERS if events[v]}
        assert all(len(ks) == len(set(ks)) for _, ks in index.confirmed())
