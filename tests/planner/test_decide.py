"""Scaling decisions: capacity, bounds, cool-down, hysteresis, draining, zero and back."""

from __future__ import annotations

from dynvllm.planner.decide import Policy, RoleState, WorkerView, decide
from dynvllm.planner.observe import Observation

BUSY = Observation(seconds=10, requests=50)
IDLE = Observation(seconds=10)


def workers(*inflight):
    return [WorkerView(f"w{i}", n) for i, n in enumerate(inflight)]


def test_scales_up_to_ceil_of_load_over_capacity_within_bounds():
    st = RoleState()
    d = decide("agg", 25.0, 10.0, workers(3), BUSY, st, Policy(max_workers=8), now=100)
    assert (d.target, d.start, d.drain, d.action) == (3, 2, (), "up")
    d = decide("agg", 500.0, 10.0, workers(3), BUSY, RoleState(), Policy(max_workers=4), now=100)
    assert d.target == 4


def test_cool_down_holds_a_scale_down_but_never_an_up():
    st = RoleState()
    pol = Policy(cooldown=30, scale_down_after=1)
    assert decide("agg", 25.0, 10.0, workers(1), BUSY, st, pol, now=100).start == 2
    # More load 10 s later: up at once, the cool-down does not hold the latency target back.
    assert decide("agg", 45.0, 10.0, workers(1, 1, 1), BUSY, st, pol, now=110).start == 2
    # Less load: 1 would do, but not within 30 s of the last change.
    d = decide("agg", 5.0, 10.0, workers(1, 1, 1, 1, 1), BUSY, st, pol, now=120)
    assert d.action == "hold" and "cool-down" in d.reason
    assert decide("agg", 5.0, 10.0, workers(1, 1, 1, 1, 1), BUSY, st, pol, now=141).target == 1


def test_a_look_between_intervals_only_adds():
    st = RoleState()
    pol = Policy(cooldown=0, scale_down_after=1)
    ws = workers(1, 1, 1)
    d = decide("agg", 5.0, 10.0, ws, BUSY, st, pol, now=100, up_only=True)
    assert d.action == "hold" and st.below == 0  # a look does not count toward a scale-down
    assert decide("agg", 45.0, 10.0, ws, BUSY, st, pol, now=101, up_only=True).start == 2


def test_scale_down_waits_for_n_intervals_below_the_threshold_and_drains_the_quietest():
    st = RoleState()
    pol = Policy(cooldown=0, scale_down_after=3, scale_down_threshold=0.7)
    ws = [WorkerView("a", 5), WorkerView("b", 0), WorkerView("c", 2)]
    # 15 req/s at 10 per worker: 2 would carry it, but not at 70% (15 > 2*10*0.7): no change.
    for t in range(5):
        assert decide("agg", 15.0, 10.0, ws, BUSY, st, pol, now=t).action == "hold"
    # 13 req/s fits 2 at 70%: only after three intervals in a row.
    assert decide("agg", 13.0, 10.0, ws, BUSY, st, pol, now=10).action == "hold"
    assert decide("agg", 13.0, 10.0, ws, BUSY, st, pol, now=11).action == "hold"
    d = decide("agg", 13.0, 10.0, ws, BUSY, st, pol, now=12)
    assert d.target == 2 and d.drain == ("b",) and d.start == 0


def test_a_busy_interval_resets_the_count():
    st = RoleState()
    pol = Policy(cooldown=0, scale_down_after=2)
    ws = workers(0, 0)
    assert decide("agg", 1.0, 10.0, ws, BUSY, st, pol, now=1).action == "hold"
    assert decide("agg", 19.0, 10.0, ws, BUSY, st, pol, now=2).action == "hold"
    assert decide("agg", 1.0, 10.0, ws, BUSY, st, pol, now=3).action == "hold"
    assert decide("agg", 1.0, 10.0, ws, BUSY, st, pol, now=4).drain == ("w0",)


def test_min_workers_is_kept_with_no_load():
    st = RoleState()
    pol = Policy(min_workers=2, cooldown=0, scale_down_after=1)
    d = decide("agg", 0.0, 10.0, workers(0, 0, 0), IDLE, st, pol, now=1)
    assert d.target == 2 and len(d.drain) == 1


def test_zero_only_after_idle_after_and_back_at_once_for_a_waiting_request():
    st = RoleState()
    pol = Policy(min_workers=0, cooldown=60, scale_down_after=1, idle_after=30)
    one = workers(0)
    assert decide("agg", 0.0, 10.0, one, IDLE, st, pol, now=100).action == "hold"  # idle since 100
    assert decide("agg", 0.0, 10.0, one, IDLE, st, pol, now=120).action == "hold"
    d = decide("agg", 0.0, 10.0, one, IDLE, st, pol, now=131)
    assert d.target == 0 and d.drain == ("w0",)
    waiting = Observation(seconds=10, waiting_for_worker=1)
    d = decide("agg", 0.0, 10.0, [], waiting, st, pol, now=135)  # within the cool-down
    assert d.start == 1 and d.target == 1


def test_a_predictions_residue_neither_holds_the_last_worker_nor_brings_one_back():
    st = RoleState()
    pol = Policy(min_workers=0, cooldown=0, scale_down_after=1, idle_after=30)
    decide("agg", 0.01, 10.0, workers(0), IDLE, st, pol, now=100)  # idle from here
    assert decide("agg", 0.01, 10.0, workers(0), IDLE, st, pol, now=120).target == 1
    d = decide("agg", 0.01, 10.0, workers(0), IDLE, st, pol, now=131)
    assert (d.target, d.drain) == (0, ("w0",))
    assert decide("agg", 0.01, 10.0, [], IDLE, st, pol, now=141).action == "hold"


def test_idle_after_is_the_whole_wait_before_zero():
    st = RoleState()
    pol = Policy(min_workers=0, cooldown=0, scale_down_after=3, idle_after=30)
    assert decide("agg", 0.0, 10.0, workers(0), IDLE, st, pol, now=100).target == 1  # idle from here
    d = decide("agg", 0.0, 10.0, workers(0), IDLE, st, pol, now=130)
    assert (d.target, d.reason) == (0, "idle")  # not 3 intervals more


def test_min_workers_zero_without_idle_after_keeps_one():
    st = RoleState()
    pol = Policy(min_workers=0, cooldown=0, scale_down_after=1)
    assert decide("agg", 0.0, 10.0, workers(0, 0), IDLE, st, pol, now=1000).target == 1


def test_workers_still_starting_count_so_a_ramp_does_not_start_twice():
    st = RoleState()
    pol = Policy(cooldown=0)
    d = decide("agg", 25.0, 10.0, workers(1), BUSY, st, pol, now=1, current=3)
    assert d.action == "hold" and d.target == 3
    waiting = Observation(seconds=10, waiting_for_worker=2)
    assert decide("agg", 0.0, 10.0, [], waiting, RoleState(), pol, now=1, current=1).start == 0
