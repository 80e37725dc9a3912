"""The admission queue's order (pure): priorities, tenants in turn, first come first served."""

from __future__ import annotations

from dynvllm.frontend.admission import FairQueue, free_slots


def drain(q: FairQueue) -> list:
    out = []
    while (item := q.pop()) is not None:
        out.append(item)
    return out


def test_lower_priority_value_goes_first_then_arrival_order():
    q: FairQueue[str] = FairQueue()
    q.push("low1", 5)
    q.push("mid", 0)
    q.push("low2", 5)
    q.push("high", -3)
    assert len(q) == 4
    assert drain(q) == ["high", "mid", "low1", "low2"]
    assert len(q) == 0 and q.pop() is None


def test_tenants_take_turns_within_a_priority():
    q: FairQueue[str] = FairQueue()
    for i in range(5):
        q.push(f"flood{i}", 0, "flood")
    q.push("light0", 0, "light")
    q.push("light1", 0, "light")
    q.push("other0", 0, "other")
    assert drain(q) == ["flood0", "light0", "other0", "flood1", "light1", "flood2", "flood3", "flood4"]


def test_a_tenant_arriving_later_waits_one_turn_at_most():
    q: FairQueue[str] = FairQueue()
    for i in range(4):
        q.push(f"a{i}", 0, "a")
    assert q.pop() == "a0"
    q.push("b0", 0, "b")
    assert [q.pop(), q.pop(), q.pop()] == ["a1", "b0", "a2"]


def test_remove_takes_out_a_waiting_item_once():
    q: FairQueue[str] = FairQueue()
    q.push("x", 1, "t")
    q.push("y", 1, "t")
    assert q.remove("x", 1, "t") and not q.remove("x", 1, "t")
    assert not q.remove("y", 2, "t") and not q.remove("y", 1, "u")
    assert len(q) == 1 and q.remove("y", 1, "t") and len(q) == 0
    assert q.pop() is None


def test_free_slots():
    assert free_slots(2, 3, 4) == 2
    assert free_slots(2, 3, 7) == 0
    assert free_slots(2, 0, 0) == 0  # no ready worker: everything waits
    assert free_slots(0, 0, 100) > 1000  # no limit
