"""Router policies are plugins (`dynvllm.router_policies`); each answers through the same interface."""

from __future__ import annotations

import time

import pytest

from dynvllm import registry
from dynvllm.frontend.routing import Router
from dynvllm.router import hashing
from dynvllm.router.policies import make_policy
from dynvllm.settings import RouterSettings

POLICIES = registry.names(registry.ROUTER_POLICIES)
# The distinct-block load alone, the defaults before 2026-12-06: the cases that guard it run at
# these weights, where a higher prefill weight alone would pass them.
DISTINCT = RouterSettings(router="kv", router_prefill_weight=1, router_decode_weight=0)


def test_the_settings_accept_exactly_the_installed_policies():
    for name in POLICIES:
        assert RouterSettings(router=name).router == name
    with pytest.raises(ValueError, match="choose one of kv, kv-approx"):
        RouterSettings(router="fastest")


def test_least_loaded_follows_the_load_the_router_sent():
    router = Router(RouterSettings(router="least-loaded"))
    router.started("a")
    router.started("a")
    router.started("b")
    assert router.choose(["a", "b", "c"])[:3] == ("c", 0, None)
    router.finished("a")
    router.finished("a")
    assert router.choose(["a", "b"])[:3] == ("a", 0, None)


def test_round_robin_cycles():
    router = Router(RouterSettings(router="round-robin"))
    assert [router.choose(["b", "a"])[0] for _ in range(4)] == ["a", "b", "a", "b"]


def test_kv_approx_predicts_from_its_own_decisions():
    router = Router(RouterSettings(router="kv-approx"))
    prompt = list(range(96))
    first, overlap, *_ = router.choose(["a", "b"], prompt, 32)
    assert overlap == 0
    again, overlap, rank, _ = router.choose(["a", "b"], prompt, 32)
    assert (again, overlap, rank) == (first, 3, None)


def test_kv_router_sends_a_prefix_being_prefilled_where_it_went():
    """Before the first request's events arrive (its prefill still running), a second request
    with the same prefix goes to the same worker; with predictions off, the first one's load sends
    it away."""
    prompt = list(range(96))
    router = Router(RouterSettings(router="kv"))
    first, overlap, *_ = router.choose(["a", "b"], prompt, 32)
    assert overlap == 0
    again, overlap, *_ = router.choose(["a", "b"], prompt + [7] * 32, 32)
    assert (again, overlap) == (first, 3)
    # Predictions expire unless the worker's events confirm them.
    router.policy.index.expire(time.monotonic() + 11)
    assert router.policy.index.overlaps(hashing.chain(prompt, 32)) == {}
    events_only = Router(RouterSettings(router="kv", router_predict_ttl=0))
    first = events_only.choose(["a", "b"], prompt, 32)
    events_only.started(first.worker, 3.0, first.rank, first.keys)
    second = events_only.choose(["a", "b"], prompt, 32)
    assert first.overlap == second.overlap == 0 and second.worker != first.worker


def test_only_event_policies_subscribe():
    uses = {name: make_policy(RouterSettings(router=name)).uses_kv_events for name in POLICIES}
    assert uses == {
        "kv": True,
        "kv-approx": False,
        "round-robin": False,
        "random": False,
        "least-loaded": False,
    }


def _stored(iid: str, rank: int, seq: int, tokens: list[int]):
    """What a worker relays when its engine stores `tokens` (engine block hashes are opaque)."""
    from dynvllm.router.block_keys import BlockKeys
    from dynvllm.runtime.kv_topic import KvEventBatch

    hashes = list(range(1, len(tokens) // 32 + 1))
    keyed = BlockKeys().translate(("stored", hashes, None, tokens, 32, None))
    return KvEventBatch(iid, rank, seq, [list(keyed)] if keyed else [])


def test_kv_router_targets_data_parallel_ranks():
    """Each rank of a data-parallel worker has its own cache: the router picks (worker, rank)."""
    from dynvllm.router import hashing

    router = Router(RouterSettings(router="kv"))
    router.set_ranks("dp", 0, 2)
    prompt = list(range(96))
    keys = hashing.chain(prompt, 32, None)
    router.on_kv_events(_stored("dp", 1, 1, prompt))  # rank 1 holds the prefix
    assert router.choose(["dp", "solo"], prompt, 32)[:3] == ("dp", 3, 1)
    # Load is per rank: rank 0 busy, rank 1 busy, so a new prefix goes to the idle single worker.
    router.started("dp", 5, 0)
    router.started("dp", 5, 1)
    assert router.choose(["dp", "solo"], list(range(500, 596)), 32)[:3] == ("solo", 0, None)
    router.finished("dp", 5, 0)
    assert router.choose(["dp", "solo"], list(range(700, 796)), 32).rank in (0, None)
    # A gap in one rank's relay sequence drops that rank only.
    router.on_kv_events(_stored("dp", 0, 1, prompt))
    router.on_kv_events(_stored("dp", 1, 5, []))
    assert router.index.overlaps(keys) == {("dp", 0): 3}
    router.forget("dp")
    assert router.choose(["solo"], prompt, 32)[:3] == ("solo", 0, None) and not router.load.ranks


def _shared_prefix_run(router: Router, workers: list[str], systems: int = 8, output: bool = False):
    """The GPU probe's load in pure logic: `systems` system prompts of 900 tokens, 64 requests
    over them with questions of their own, 16 in flight, the oldest finishing first; with
    `output`, each request in flight fills another KV block with output whenever one arrives.
    Returns (requests sent where their system prompt had been before, requests per worker);
    everything has finished at the end."""
    import random
    from collections import Counter, deque

    bs, blocks = 16, float(-(-930 // 16))
    prompts = [list(range(10_000 * s, 10_000 * s + 900)) for s in range(systems)]
    pairs = [(i % systems, i) for i in range(64)]
    random.Random(1).shuffle(pairs)
    inflight: deque = deque()
    hits, spread, seen = 0, Counter(), set()
    for s, q in pairs:
        if len(inflight) == 16:
            router.finished(*inflight.popleft())
        if output:
            for n, (w, b, r, k, grown) in enumerate(inflight):
                router.grow(w, r, 1)
                inflight[n] = (w, b, r, k, grown + 1)
        pick = router.choose(workers, prompts[s] + [9_000_000 + 100 * q + i for i in range(30)], bs)
        hits += (pick.worker, s) in seen  # the engine has that system prompt from before
        seen.add((pick.worker, s))
        spread[pick.worker] += 1
        router.started(pick.worker, blocks, pick.rank, pick.keys)
        inflight.append((pick.worker, blocks, pick.rank, pick.keys, 0))
    while inflight:
        router.finished(*inflight.popleft())
    return hits, spread


def test_kv_router_keeps_shared_prefixes_together_under_load():
    """Found on a GPU: with every in-flight prompt block counted as load, one request's worth of
    imbalance outweighed a cached 900-token prefix, and two engines cached no more than
    round-robin. In-flight requests sharing a prefix share its blocks, so the load counts them
    once: each system prompt misses once (as on one engine), and both workers still get work. At
    weight 1 with no decode weight, where counting whole prompts broke it; the defaults too."""
    one, _ = _shared_prefix_run(Router(RouterSettings(router="kv")), ["solo"])
    assert one == 64 - 8
    for router in (
        Router(DISTINCT),
        Router(RouterSettings(router="kv")),
    ):
        hits, spread = _shared_prefix_run(router, ["a", "b"])
        assert hits >= one - 2, (hits, spread)
        assert min(spread.values()) >= 16, spread
        # All finished: no load is left, however much of it was shared.
        assert not any(router.load.active_blocks.values()) and not any(router.load.held.values())
    # Round-robin finds a prefix where it sends a request only about every other time.
    rr_hits, _ = _shared_prefix_run(Router(RouterSettings(router="round-robin")), ["a", "b"])
    assert rr_hits < one - 4


def test_kv_router_spreads_one_hot_prefix_as_output_fills_the_cache():
    """One system prompt for everything: the output blocks requests fill make the busy worker
    dearer until the second takes requests too (paying for the prefix once). With the default
    prefill weight of 8 that takes the default decode weight: without it the holder's distinct
    blocks never outweigh eight times the prefix, and all 64 pile onto it."""
    for router in (
        Router(RouterSettings(router="kv")),
        Router(DISTINCT),
    ):
        hits, spread = _shared_prefix_run(router, ["a", "b"], systems=1, output=True)
        assert hits == 62 and min(spread.values()) >= 24, (hits, spread)
        assert not any(router.load.active_blocks.values()) and not any(router.load.held.values())
    piled = Router(RouterSettings(router="kv", router_decode_weight=0))
    assert sorted(_shared_prefix_run(piled, ["a", "b"], systems=1, output=True)[1].values()) == [64]


def test_decode_weight_spreads_one_hot_prefix_that_distinct_blocks_pile_up():
    """Requests sharing one hot prompt add only their own tails to its holder's distinct blocks,
    so without output filling the cache all 64 go there while the other worker idles; a decode
    step reads every sequence's context, and `router_decode_weight` counts it per request. The
    prefix is then paid for once more, and eight prompts stay about as well kept together."""
    piled, spread = _shared_prefix_run(Router(DISTINCT), ["a", "b"], systems=1)
    assert (piled, sorted(spread.values())) == (63, [64])
    weighted = RouterSettings(router="kv", router_prefill_weight=1, router_decode_weight=0.5)
    router = Router(weighted)
    hits, spread = _shared_prefix_run(router, ["a", "b"], systems=1)
    assert hits == 62 and min(spread.values()) >= 28, (hits, spread)
    assert not any(router.load.contexts.values()) and not any(router.load.rank_contexts.values())
    hits, spread = _shared_prefix_run(Router(weighted), ["a", "b"], systems=8, output=True)
    assert hits >= 64 - 8 - 3 and min(spread.values()) >= 24, (hits, spread)
