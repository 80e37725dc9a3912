"""Router policies come from one table; each answers through the same interface."""

from __future__ import annotations

import pytest

from dynvllm.frontend.routing import Router
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
    assert router.choose(["a", "b", "c"]) == ("c", 0)
    router.finished("a")
    router.finished("a")
    assert router.choose(["a", "b"]) == ("a", 0)


def test_round_robin_cycles():
    router = Router(RouterSettings(router="round-robin"))
    assert [router.choose(["b", "a"])[0] for _ in range(4)] == ["a", "b", "a", "b"]


def test_kv_approx_predicts_from_its_own_decisions():
    router = Router(RouterSettings(router="kv-approx"))
    prompt = list(range(96))
    first, overlap = router.choose(["a", "b"], prompt, 32)
    assert overlap == 0
    again, overlap = router.choose(["a", "b"], prompt, 32)
    assert (again, overlap) == (first, 3)


def test_only_event_policies_subscribe():
    uses = {name: make_policy(RouterSettings(router=name)).uses_kv_events for name in POLICIES}
    assert uses == {
        "kv": True,
        "kv-approx": False,
        "round-robin": False,
        "random": False,
        "least-loaded": False,
    }
