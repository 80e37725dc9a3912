"""Capacity at the targets from a sweep, interpolated over the (ISL, OSL) grid."""

from __future__ import annotations

import json

import pytest

from dynvllm.planner.profile import Level, Point, Profile, ProfileError, load


def lv(c, rate, ttft, itl):
    return Level(c, rate, ttft / 2, ttft, itl / 2, itl)


def point(isl, osl, base):
    # Rate grows with concurrency, latency too: the targets cut the sweep somewhere.
    return Point(isl, osl, [lv(1, base, 0.1, 0.01), lv(4, 3 * base, 0.3, 0.02), lv(16, 6 * base, 1.5, 0.08)])


def grid():
    return Profile(
        {"agg": [point(100, 10, 10.0), point(1000, 10, 4.0), point(100, 100, 2.0), point(1000, 100, 1.0)]}
    )


def test_capacity_is_the_best_rate_within_both_targets():
    p = point(100, 10, 10.0)
    assert p.capacity(0.5, 0.05) == 30.0
    assert p.capacity(2.0, 0.1) == 60.0
    assert p.capacity(2.0, 0.015) == 10.0  # ITL rules out concurrency 4
    assert p.capacity(0.01, 0.001) == 10.0  # nothing meets: the lowest level's rate


def test_grid_points_and_bilinear_between_them():
    prof = grid()
    assert prof.capacity("agg", 100, 10, 0.5, 0.05) == 30.0
    assert prof.capacity("agg", 1000, 100, 0.5, 0.05) == 3.0
    assert prof.capacity("agg", 550, 10, 0.5, 0.05) == pytest.approx((30 + 12) / 2)
    mid = prof.capacity("agg", 550, 55, 0.5, 0.05)
    assert mid == pytest.approx((30 + 12 + 6 + 3) / 4)


def test_outside_the_grid_is_clamped():
    prof = grid()
    assert prof.capacity("agg", 10, 1, 0.5, 0.05) == 30.0
    assert prof.capacity("agg", 10**6, 10**4, 0.5, 0.05) == 3.0


def test_unknown_role_names_the_fix():
    with pytest.raises(ProfileError, match="dynvllm profile --role decode"):
        grid().capacity("decode", 100, 10, 0.5, 0.05)


def test_round_trip_through_json(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(grid().to_dict()))
    again = load(path)
    assert again.capacity("agg", 550, 55, 0.5, 0.05) == grid().capacity("agg", 550, 55, 0.5, 0.05)
    path.write_text('{"roles": {"agg": {"points": [{"isl": 1}]}}}')
    with pytest.raises(ProfileError, match="not a dynvllm profile"):
        load(path)


def test_disaggregated_roles_are_read_by_the_target_each_governs(tmp_path):
    # One sweep of a prefill + decode pair: TTFT grows with load long before ITL does.
    sweep = [lv(1, 2.0, 0.2, 0.01), lv(4, 6.0, 0.9, 0.012), lv(16, 12.0, 3.0, 0.03)]
    prof = Profile(
        {"prefill": [Point(100, 10, sweep)], "decode": [Point(100, 10, sweep)]},
        targets={"prefill": ("ttft",), "decode": ("itl",)},
    )
    assert prof.capacity("prefill", 100, 10, 1.0, 0.02) == 6.0  # TTFT 3.0 > 1.0 rules out c=16
    assert prof.capacity("decode", 100, 10, 1.0, 0.02) == 6.0  # ITL 0.03 > 0.02 rules out c=16
    assert prof.capacity("prefill", 100, 10, 1.0, 0.011) == 6.0  # ITL is not prefill's
    assert prof.capacity("decode", 100, 10, 0.5, 0.05) == 12.0  # nor TTFT decode's
    path = tmp_path / "p.json"
    path.write_text(json.dumps(prof.to_dict()))
    assert load(path).targets == {"prefill": ("ttft",), "decode": ("itl",)}
    data = prof.to_dict()
    data["roles"]["decode"]["targets"] = ["latency"]
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="targets are ttft and/or itl"):
        load(path)
