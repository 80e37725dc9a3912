"""Offload tiers: events with a medium, holders per tier, and the cost that credits them."""

from __future__ import annotations

from dynvllm.router import hashing
from dynvllm.router.block_keys import BlockKeys
from dynvllm.router.index import KvIndex
from dynvllm.router.kv_events import decode_event
from dynvllm.router.kv_policy import KvPolicy
from dynvllm.router.tiers import CPU, DISK, GPU, tier_of
from dynvllm_plugins.engines.sim import BlockCache

BS = 4


def _stored(hashes, parent, tokens, medium, block_size=BS):  # type: ignore[no-untyped-def]
    return decode_event(
        {
            "type": "BlockStored",
            "block_hashes": hashes,
            "parent_block_hash": parent,
            "token_ids": tokens,
            "block_size": block_size,
            "lora_name": None,
            "medium": medium,
        }
    )


def _removed(hashes, medium):  # type: ignore[no-untyped-def]
    return decode_event({"type": "BlockRemoved", "block_hashes": hashes, "medium": medium})


def test_medium_names_a_tier():
    assert [tier_of(m) for m in (None, "GPU", "gpu", "CPU", "cpu", "STORAGE", "DISK", "nvme")] == [
        GPU,
        GPU,
        GPU,
        CPU,
        CPU,
        DISK,
        DISK,
        DISK,
    ]


def test_offloaded_blocks_keep_their_key_per_tier():
    keys = BlockKeys()
    want = hashing.chain(list(range(8)), BS)
    assert keys.translate(_stored([1, 2], None, list(range(8)), "GPU")) == ("stored", want)
    # vLLM's offloading connector reports a CPU store by hash only: keyed through the GPU's key.
    assert keys.translate(_stored([2], None, [], "CPU", block_size=0)) == ("stored", want[1:], CPU)
    assert keys.translate(_removed([2], "GPU")) == ("removed", want[1:])
    # Gone from the GPU, the block is still in the CPU tier: its removal there is keyed too.
    assert keys.translate(_removed([2], "CPU")) == ("removed", want[1:], CPU)
    # A hash no tier knows cannot be keyed: counted, not relayed.
    assert keys.translate(_stored([99], None, [], "STORAGE", block_size=0)) is None
    assert keys.orphans == 1


def test_reannounced_offload_blocks_need_as_many_removals():
    keys = BlockKeys()
    want = hashing.chain(list(range(4)), BS)
    keys.translate(_stored([1], None, list(range(4)), "CPU"))
    keys.translate(_stored([1], None, list(range(4)), "CPU"))  # a second chunk re-announces it
    assert keys.translate(_removed([1], "CPU")) is None
    assert keys.translate(_removed([1], "CPU")) == ("removed", want, CPU)


def test_cleared_resets_the_gpu_only():
    index, w = KvIndex(), ("a", 0)
    keys = hashing.chain(list(range(8)), BS)
    index.apply(w, ("stored", keys))
    index.apply(w, ("stored", keys, CPU))
    index.apply(w, ("cleared",))
    assert index.overlaps(keys) == {}
    assert index.tiered(keys) == {w: (0, 2, 2)}


def test_tiered_depths_and_gpu_only_path():
    index = KvIndex()
    keys = hashing.chain(list(range(24)), BS)  # 6 blocks
    a, b, c = ("a", 0), ("b", 0), ("c", 0)
    index.apply(a, ("stored", keys[:2]))
    assert index.tiered(keys) is None  # no lower tier yet: the plain lookup says it all
    index.apply(a, ("stored", keys[1:4], CPU))  # GPU 0-1, CPU 1-3
    index.apply(a, ("stored", keys[4:5], DISK))
    index.apply(b, ("stored", keys[:6], DISK))
    index.apply(c, ("stored", keys[1:6], CPU))  # no first block: nothing usable
    assert index.tiered(keys) == {a: (2, 4, 5), b: (0, 0, 6)}
    index.apply(a, ("removed", keys[1:4], CPU))
    index.apply(b, ("removed", keys[:6], DISK))
    index.apply(a, ("removed", keys[4:5], DISK))
    index.apply(c, ("removed", keys[1:6], CPU))
    assert index.tiered(keys) is None
    index.drop_worker(a)
    assert index.overlaps(keys) == {}


def test_cost_credits_a_cpu_prefix_by_its_load_cost():
    index = KvIndex()
    keys = hashing.chain(list(range(40)), BS)  # 10 blocks
    on_cpu, cold, on_gpu = ("cpu", 0), ("cold", 0), ("gpu", 0)
    index.apply(on_cpu, ("stored", keys, CPU))
    index.apply(cold, ("stored", hashing.chain(list(range(100, 140)), BS)))
    aware = KvPolicy(index)
    d = aware.choose([cold, on_cpu], keys, {})
    assert d.worker == on_cpu and d.overlap_blocks == 10
    # prefill weight 1: cpu = 1 x 10 x 0.1 + 10 active = 11; cold = 2 x 10 = 20
    assert d.cost == 11.0
    # Cost 1 per CPU block: the GPU-only view, where both are cold and the tie goes by the key.
    blind = KvPolicy(index, cpu_cost=1.0)
    costs = {w: blind.choose([w], keys, {}).cost for w in (cold, on_cpu)}
    assert costs == {cold: 20.0, on_cpu: 20.0}
    # A GPU-resident prefix beats a CPU-resident one.
    index.apply(on_gpu, ("stored", keys))
    assert aware.choose([on_cpu, on_gpu], keys, {}).worker == on_gpu
    # ...unless the GPU worker is loaded by more than what the CPU load saves.
    assert aware.choose([on_cpu, on_gpu], keys, {"gpu": 12.0}).worker == on_cpu


def test_sim_cpu_tier_events_rebuild_its_state_in_the_index():
    """The sim engine's GPU evicts into its CPU tier; its events, keyed as workers key them,
    leave the index holding exactly what each of its tiers holds."""
    cache = BlockCache(4, salt=7, cpu_capacity=8)
    relay, index, w = BlockKeys(), KvIndex(), ("sim", 0)
    prompts = [list(range(s, s + 16)) for s in (0, 100, 200, 0, 300)]
    found = []
    for tokens in prompts:
        keys = hashing.chain(tokens, BS)
        hits = cache.acquire(keys, tokens, BS)
        assert hits is not None
        found.append((hits, cache.loaded))
        cache.release(keys)
        for raw in cache.events:
            ev = relay.translate(decode_event(raw))
            if ev is not None:
                index.apply(w, ev)
        cache.events.clear()
    # The fourth prompt repeats the first after two others pushed it out of the GPU (4 blocks)
    # into the CPU tier: it found all 4 blocks and loaded them from there.
    assert found == [(0, 0), (0, 0), (0, 0), (4, 4), (0, 0)]
    gpu_keys = {k for k, h in index.holders.items() if h == 1}  # worker id 0's bit
    assert gpu_keys == set(cache.ref)
    assert set(index.lower[CPU].holders) == set(cache.cpu)
    assert len(cache.cpu) == 8


def test_a_peer_snapshot_carries_the_offload_tiers():
    from dynvllm.router import snapshot
    from dynvllm.router.policies import KvRouting
    from dynvllm.runtime.kv_topic import KvEventBatch
    from dynvllm.settings import RouterSettings, Settings

    settings = Settings(router=RouterSettings(router="kv"))
    warm, cold = KvRouting(settings), KvRouting(settings)
    keys = hashing.chain(list(range(40)), BS)
    warm.on_kv_events(KvEventBatch("a", 0, 1, [["stored", keys[:3]], ["stored", keys, CPU]]))
    warm.on_kv_events(KvEventBatch("b", 0, 1, [["stored", keys[:6], DISK]]))
    messages = list(snapshot.encode(warm.snapshot() or iter(()), limit=4096 + 8 * 4))  # split records
    for _ in cold.restore(snapshot.decode(messages), []):
        pass
    assert cold.index.tiered(keys) == warm.index.tiered(keys) == {("a", 0): (3, 10, 10), ("b", 0): (0, 0, 6)}
    # Events after the snapshot continue both tiers' state.
    cold.on_kv_events(KvEventBatch("a", 0, 2, [["removed", keys[5:], CPU]]))
    assert cold.index.tiered(keys) == {("a", 0): (3, 5, 5), ("b", 0): (0, 0, 6)}


def test_tiered_depths_match_a_per_worker_walk_on_random_holdings():
    """Up to 40 workers: holder masks wider than a machine word, groups of many workers."""
    import random

    rng = random.Random(5)
    for case in range(200):
        index = KvIndex()
        keys = hashing.chain(list(range(rng.randrange(4, 40))), BS)
        held: dict[tuple[str, int], dict[int, set[int]]] = {}
        for w in [(f"w{i}", 0) for i in range(rng.randrange(1, 40 if case % 2 else 6))]:
            held[w] = {}
            for tier in (GPU, CPU, DISK):
                # Long shared prefixes on the GPU (as caches keep them), holes anywhere below.
                p = 0.97 if tier == GPU else 0.5
                mine = [k for k in keys if rng.random() < p]
                if mine:
                    index.apply(w, ("stored", mine) if tier == GPU else ("stored", mine, tier))
                gone = [k for k in mine if rng.random() < 0.05]
                if gone:
                    index.apply(w, ("removed", gone) if tier == GPU else ("removed", gone, tier))
                held[w][tier] = set(mine) - set(gone)

        def depth(w, tiers, keys=keys, held=held):  # type: ignore[no-untyped-def]
            d = 0
            while d < len(keys) and any(keys[d] in held[w][t] for t in tiers):
                d += 1
            return d

        want = {}
        for w in held:
            t = (depth(w, [GPU]), depth(w, [GPU, CPU]), depth(w, [GPU, CPU, DISK]))
            if t[2]:
                want[w] = t
        assert index.tiered(keys) == want
        gpu, further = index.lookup(keys)
        assert gpu == index.overlaps(keys) == {w: t[0] for w, t in want.items() if t[0]}
        assert further == {w: t for w, t in want.items() if t[2] > t[0]}


def test_a_gone_instance_frees_its_worker_id_for_the_next():
    index = KvIndex()
    keys = hashing.chain(list(range(40)), BS)
    a, b, c = ("a", 0), ("b", 0), ("c", 0)
    index.apply(a, ("stored", keys))
    index.apply(a, ("stored", keys, CPU))
    index.apply(b, ("stored", keys[:4]))
    index.drop_instance("a")
    assert index.tiered(keys) is None and index.overlaps(keys) == {b: 4}
    index.apply(c, ("stored", keys[:2]))  # takes a's id: none of a's blocks come with it
    assert index.overlaps(keys) == {b: 4, c: 2}
    assert index.holders[keys[0]].bit_count() == 2 and len(index._workers) == 2
    assert list(index.confirmed()) == [(b, keys[:4]), (c, keys[:2])]


def test_workers_held_only_below_are_counted_through_any_sequence_of_events(monkeypatch):
    """The per-worker blocks held in a lower tier and not on the GPU (what lets a lookup skip the
    tiers while they hold copies only) stay exact through stores, removals in every tier,
    predictions that expire, cleared caches and dropped workers, with the tiers' logs compacted
    as they go; each tier's holders, counts and snapshot match a per-worker model, and lookups
    agree with a walk."""
    import random

    from dynvllm.router import key_log

    monkeypatch.setattr(key_log, "LOG_MIN", 4)
    rng = random.Random(11)
    keys = hashing.chain(list(range(48)), BS)  # 12 blocks
    workers = [(f"w{i}", 0) for i in range(12)]
    for _ in range(60):
        index = KvIndex()
        held = {w: {GPU: set(), CPU: set(), DISK: set()} for w in workers}
        predicted: dict[tuple[str, int], set[int]] = {w: set() for w in workers}
        now = 0.0
        for _ in range(80):
            w, tier = rng.choice(workers), rng.choice((GPU, GPU, CPU, DISK))
            a = rng.randrange(len(keys))
            some = keys[a : a + rng.randrange(1, 6)]
            if rng.random() < 0.2:  # a key twice in one event (blocks of equal tokens, two salts)
                some = some + some[-1:]
            op = rng.random()
            if op < 0.45:
                index.apply(w, ("stored", some) if tier == GPU else ("stored", some, tier))
                held[w][tier].update(some)
                if tier == GPU:
                    predicted[w].difference_update(some)
            elif op < 0.75:
                index.apply(w, ("removed", some) if tier == GPU else ("removed", some, tier))
                held[w][tier].difference_update(some)
                if tier == GPU:
                    predicted[w].difference_update(some)
            elif op < 0.85:
                fresh = [k for k in some if k not in held[w][GPU]]
                index.predict(w, some, 1.0, now)
                predicted[w].update(fresh)
                held[w][GPU].update(some)
            elif op < 0.9:
                now += 2.0
                index.expire(now)
                for v in workers:
                    held[v][GPU] -= predicted[v]
                    predicted[v].clear()
            elif op < 0.95:
                index.apply(w, ("cleared",))
                held[w][GPU].clear()
                predicted[w].clear()
            else:
                index.drop_worker(w)
                held[w] = {GPU: set(), CPU: set(), DISK: set()}
                predicted[w].clear()
            for tier in (CPU, DISK):
                want_deep = {}
                for v in workers:
                    if n := len(held[v][tier] - held[v][GPU]):
                        want_deep[index._ids[v]] = n
                child = index.lower.get(tier)
                deep = child.deep if child is not None else {}
                assert {v: len(ks) for v, ks in deep.items()} == want_deep
                assert (child.deep_mask if child is not None else 0) == sum(1 << w for w in want_deep)
                want_holders: dict[int, int] = {}
                for v in workers:
                    for k in held[v][tier]:
                        want_holders[k] = want_holders.get(k, 0) | 1 << index._ids[v]
                assert (child.holders if child is not None else {}) == want_holders
                assert index.tier_block_count(tier) == sum(len(held[v][tier]) for v in workers)
                for log in child.logs.values() if child is not None else ():
                    assert sum(len(x) for x in log.lists) <= 4 * len(keys) + 6
        snap = {}
        for tier, v, ks in index.confirmed_lower():
            assert len(ks) == len(set(ks)) and (tier, v) not in snap
            snap[tier, v] = set(ks)
        assert snap == {(t, v): held[v][t] for v in workers for t in (CPU, DISK) if held[v][t]}

        def depth(v, tiers, held=held):  # type: ignore[no-untyped-def]
            d = 0
            while d < len(keys) and any(keys[d] in held[v][t] for t in tiers):
                d += 1
            return d

        want = {}
        for v in workers:
            t = (depth(v, [GPU]), depth(v, [GPU, CPU]), depth(v, [GPU, CPU, DISK]))
            if t[2] > t[0]:
                want[v] = t
        assert index.lookup(keys)[1] == want
