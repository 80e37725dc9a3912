"""Router policies come from one table; each answers through the same interface."""

from __future__ import annotations

import time

import pytest

from dynvllm.frontend.routing import Router
from dynvllm.router import hashing
from dynvllm.router.policies import POLICIES, make_policy
from dynvllm.settings import RouterSettings


def test_the_settings_accept_exactly_the_table():
    for name in POLICIES:
        assert RouterSettings(router=name).router == name
    with pytest.raises(ValueError, match="choose one of kv, kv-approx"):
        RouterSettings(router="fastest")


def test_least_loaded_follows_the_load_the_router_sent():
    router = Router(RouterSettings(router="least-loaded"))
    router.started("a")
    router.started("a")
    router.started("b")
    assert router.choose(["a", "b", "c"]) == ("c", 0, None)
    router.finished("a")
    router.finished("a")
    assert router.choose(["a", "b"]) == ("a", 0, None)


def test_round_robin_cycles():
    router = Router(RouterSettings(router="round-robin"))
    assert [router.choose(["b", "a"])[0] for _ in range(4)] == ["a", "b", "a", "b"]


def test_kv_approx_predicts_from_its_own_decisions():
    router = Router(RouterSettings(router="kv-approx"))
    prompt = list(range(96))
    first, overlap, _ = router.choose(["a", "b"], prompt, 32)
    assert overlap == 0
    again, overlap, rank = router.choose(["a", "b"], prompt, 32)
    assert (again, overlap, rank) == (first, 3, None)


def test_kv_router_sends_a_prefix_being_prefilled_where_it_went():
    """Before the first request's events arrive (its prefill still running), a second request
    with the same prefix goes to the same worker; with predictions off, the tie rotates away."""
    prompt = list(range(96))
    router = Router(RouterSettings(router="kv"))
    first, overlap, _ = router.choose(["a", "b"], prompt, 32)
    assert overlap == 0
    again, overlap, _ = router.choose(["a", "b"], prompt + [7] * 32, 32)
    assert (again, overlap) == (first, 3)
    # Predictions expire unless the worker's events confirm them.
    router.policy.index.expire(time.monotonic() + 11)
    assert router.policy.index.overlaps(hashing.chain(prompt, 32)) == {}
    events_only = Router(RouterSettings(router="kv", router_predict_ttl=0))
    picks = [events_only.choose(["a", "b"], prompt, 32) for _ in range(2)]
    assert {p[0] for p in picks} == {"a", "b"} and all(p[1] == 0 for p in picks)


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
    assert router.choose(["dp", "solo"], prompt, 32) == ("dp", 3, 1)
    # Load is per rank: rank 0 busy, rank 1 busy, so a new prefix goes to the idle single worker.
    router.started("dp", 5, 0)
    router.started("dp", 5, 1)
    assert router.choose(["dp", "solo"], list(range(500, 596)), 32) == ("solo", 0, None)
    router.finished("dp", 5, 0)
    assert router.choose(["dp", "solo"], list(range(700, 796)), 32).rank in (0, None)
    # A gap in one rank's relay sequence drops that rank only.
    router.on_kv_events(_stored("dp", 0, 1, prompt))
    router.on_kv_events(_stored("dp", 1, 5, []))
    assert router.index.overlaps(keys) == {("dp", 0): 3}
    router.forget("dp")
    assert router.choose(["solo"], prompt, 32) == ("solo", 0, None) and not router.load.ranks
