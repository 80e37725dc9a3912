"""Dividing a tenant's limits between frontend processes (pure): the parts add up to the limits,
follow demand, keep what a process holds, and every process computes the same ones."""

from __future__ import annotations

import random

import pytest

from dynvllm.frontend.quota_shares import IDLE, Usage, allocate, bound, fair, whole
from dynvllm.frontend.tenants import Limits, Share, TenantSpec


def test_fair_meets_small_demands_and_splits_the_rest():
    assert fair(10.0, {"a": 50.0, "b": 1.0}) == {"a": 9.0, "b": 1.0}
    assert fair(10.0, {"a": 50.0, "b": 50.0}) == {"a": 5.0, "b": 5.0}
    # Nobody asks for all of it: what is left is split equally (a first request can pass anywhere).
    assert fair(10.0, {"a": 2.0, "b": 0.0, "c": 0.0}) == pytest.approx(
        {"a": 2 + 8 / 3, "b": 8 / 3, "c": 8 / 3}
    )
    assert fair(10.0, {"a": 0.0, "b": 0.0}) == {"a": 5.0, "b": 5.0}
    assert fair(1.0, {}) == {}


def test_whole_keeps_what_is_held_and_adds_up():
    # 8 slots: a holds 5 and wants 9, b holds 1 and wants 1, c holds none.
    parts = whole(8, {"a": 5, "b": 1, "c": 0}, {"a": 9, "b": 1, "c": 0})
    assert parts == {"a": 7, "b": 1, "c": 0}
    # Idle: equal parts, remainders by id.
    assert whole(2, {"a": 0, "b": 0, "c": 0, "d": 0}, {}) == {"a": 1, "b": 1, "c": 0, "d": 0}
    # Held beyond the limit (a stale view): no one gets a new slot.
    assert whole(4, {"a": 3, "b": 2}, {"a": 9, "b": 9}) == {"a": 3, "b": 2}


def test_random_reports_always_add_up_to_the_limits():
    spec = TenantSpec(keys=["k"], requests_per_second=7, tokens_per_minute=6000, max_concurrent=5)
    rng = random.Random(1)
    for _ in range(500):
        n = rng.randint(1, 6)
        usages = {}
        for i in range(n):
            inflight = rng.randint(0, 2)
            usages[f"p{i}"] = Usage(
                rng.random() * 20, rng.random() * 300, inflight + rng.randint(0, 3), inflight
            )
        shares = allocate(spec, usages)
        assert sum(s.requests for s in shares.values()) == pytest.approx(1.0)
        assert sum(s.tokens for s in shares.values()) == pytest.approx(1.0)
        held = sum(u.inflight for u in usages.values())
        assert sum(s.concurrent or 0 for s in shares.values()) == max(5, held)
        assert all((s.concurrent or 0) >= usages[k].inflight for k, s in shares.items())
        # Every process computes the same parts from the same reports, in whatever order it got them.
        shuffled = dict(rng.sample(list(usages.items()), n))
        assert allocate(spec, shuffled) == shares


def test_a_flooded_process_gets_the_rate_a_quiet_one_needs_the_rest():
    spec = TenantSpec(keys=["k"], requests_per_second=10)
    shares = allocate(spec, {"flooded": Usage(requests=100.0), "quiet": Usage(requests=1.0)})
    assert shares["quiet"].requests == pytest.approx(0.1) and shares["flooded"].requests == pytest.approx(0.9)
    # Both flooded: halves. One gone: the survivor's share is the whole.
    both = allocate(spec, {"a": Usage(requests=100.0), "b": Usage(requests=100.0)})
    assert both["a"].requests == pytest.approx(0.5)
    assert allocate(spec, {"a": Usage(requests=100.0)})["a"] == Share(1.0, 1.0, None)


def test_a_share_scales_the_local_buckets_and_slots():
    spec = TenantSpec(keys=["k"], requests_per_second=10, burst=10, max_concurrent=4)
    limits = Limits({"t": spec}, 0.0)
    limits.set_share("t", Share(0.25, 1.0, 1), 0.0)
    state = limits.states["t"]
    assert state.requests is not None
    assert (state.requests.rate, state.requests.capacity, state.requests.level) == (2.5, 2.5, 2.5)
    assert limits.admit("t", 1, "m", None, 1, 0.0) is None
    refusal = limits.admit("t", 2, "m", None, 1, 0.0)
    assert refusal is not None and refusal.reason == "concurrency" and "limit of 4" in refusal.message
    limits.finish("t", 1, 0, True, 0.0)
    assert limits.admit("t", 3, "m", None, 1, 0.0) is None
    limits.finish("t", 3, 0, True, 0.0)
    refusal = limits.admit("t", 4, "m", None, 1, 0.0)  # 2.5 in the bucket, 2 taken: 0.5 left
    assert refusal is not None and refusal.reason == "requests"
    # The wait is told at the tenant's whole rate (0.5 at 2.5/s is 0.2 s here, 0.05 s at 10/s).
    assert refusal.retry_after == pytest.approx(0.05)
    demand = limits.take_demand()["t"]
    assert (demand.requests, demand.tokens, demand.blocked) == (4, 4, 1)
    assert limits.take_demand()["t"].requests == 0
    # A share too small for one request still lets one through now and then.
    limits.set_share("t", Share(0.01, 1.0, None), 10.0)
    assert state.requests.capacity == 1.0 and state.requests.rate == pytest.approx(0.1)


def test_the_bound_is_the_rate_the_burst_and_one_per_process():
    spec = TenantSpec(keys=["k"], requests_per_second=5, tokens_per_minute=600, max_concurrent=3)
    assert bound(spec, 4, 2.0) == {"requests": 5 * 2 + 5 + 3, "tokens": 20 + 600 + 3, "concurrent": 3}
    assert allocate(spec, {"a": IDLE}) == {"a": Share(1.0, 1.0, 3)}
