"""Room on a model's workers from their load reports (pure)."""

from __future__ import annotations

import math

from dynvllm.frontend.admission_load import Report, Room, Thresholds, room, worker_room

WAIT2 = Thresholds(max_waiting=2)


def test_a_worker_has_its_batch_plus_the_allowed_queue_less_what_it_holds():
    assert worker_room(Report(3, 0, 0, 0), 8, WAIT2) == Room(7, math.inf)
    assert worker_room(Report(8, 1, 0, 0), 8, WAIT2) == Room(1, math.inf)
    assert worker_room(Report(8, 2, 0, 0), 8, WAIT2) == Room(0, 0)
    # Queueing while its batch is not full (short of KV): saturated all the same.
    assert worker_room(Report(5, 2, 0, 0), 8, WAIT2) == Room(0, 0)
    # With no queue allowed, a full batch is saturated and one short of it has room for one.
    assert worker_room(Report(8, 0, 0, 0), 8, Thresholds(max_waiting=0)) == Room(0, 0)
    assert worker_room(Report(7, 0, 0, 0), 8, Thresholds(max_waiting=0)) == Room(1, math.inf)
    # Batch size unknown: the queue's room, and one more while nothing waits (never stuck at 0).
    assert worker_room(Report(3, 0, 0, 0), None, WAIT2) == Room(3, math.inf)
    assert worker_room(Report(0, 0, 0, 0), None, Thresholds(max_waiting=0)) == Room(1, math.inf)
    assert worker_room(Report(3, 1, 0, 0), None, WAIT2) == Room(1, math.inf)


def test_kv_use_saturates_a_worker_at_its_threshold():
    kv = Thresholds(max_kv_use=0.8)
    assert worker_room(Report(1, 0, 50, 100), None, kv) == Room(math.inf, 30)
    assert worker_room(Report(1, 0, 80, 100), None, kv) == Room(0, 0)
    # Both measures: either one saturates it.
    both = Thresholds(max_waiting=2, max_kv_use=0.8)
    assert worker_room(Report(8, 0, 90, 100), 8, both) == Room(0, 0)
    assert worker_room(Report(8, 5, 10, 100), 8, both) == Room(0, 0)
    assert worker_room(Report(4, 0, 10, 100), 8, both) == Room(6, 70)
    # A worker that reports no KV total is not judged by it.
    assert worker_room(Report(1, 0, 0, 0), None, kv) == Room(math.inf, math.inf)


def test_what_was_let_through_since_the_reports_takes_room_and_what_ended_gives_it_back():
    # Two workers of 4 sequences; when their reports came, 6 of this frontend's requests were out.
    reports = [(Report(3, 0, 0, 0, requests=6, blocks=12), 4), (Report(3, 0, 0, 0, requests=6, blocks=12), 4)]
    assert room(reports, WAIT2, 6, 12).requests == 6  # (4 + 2 - 3) x 2
    assert room(reports, WAIT2, 10, 20).requests == 2  # four let through since
    assert not room(reports, WAIT2, 12, 24).any
    assert room(reports, WAIT2, 4, 8).requests == 8  # two ended since
    # Reports taken at different moments: what was let through since counts from their mean.
    apart = [(Report(4, 2, 0, 0, requests=8), 4), (Report(2, 0, 0, 0, requests=4), 4)]
    assert room(apart, WAIT2, 8, 0).requests == 4 - (8 - 6)
    # Requests of this frontend that no engine held when it reported (on their way) take room too.
    transit = [(Report(0, 0, 0, 0, requests=2), 2)]
    assert room(transit, Thresholds(max_waiting=0), 2, 0).requests == 0
    assert room(transit, Thresholds(max_waiting=0), 1, 0).requests == 1
    # A saturated worker adds no room, and takes none off the other's.
    mixed = [(Report(4, 3, 0, 0, requests=5), 4), (Report(1, 0, 0, 0, requests=5), 4)]
    assert room(mixed, WAIT2, 5, 0).requests == 5


def test_unknown_and_absent_workers():
    # One that has not reported (just started) counts as idle: its batch plus the queue allowed,
    # less what this frontend let through meanwhile (an in-flight cap until it reports).
    assert room([(None, 4), (Report(4, 2, 0, 0, requests=6), 4)], WAIT2, 6, 0).requests == 6 + 0 - (6 - 3)
    assert not room([(None, 4)], WAIT2, 6, 0).any and room([(None, 4)], WAIT2, 5, 0).any
    assert room([(None, None)], Thresholds(max_waiting=0), 0, 0).any
    assert not room([(None, None)], Thresholds(max_waiting=0), 1, 0).any
    # No worker at all has no room.
    assert not room([], WAIT2, 0, 0).any
    # Nothing set: never saturated.
    assert room([(Report(9, 99, 100, 100), 4)], Thresholds(), 1000, 1000) == Room(math.inf, math.inf)
    # KV room is blocks: a long prompt still goes when some room is left (soft threshold).
    kv = Thresholds(max_kv_use=0.5)
    assert room([(Report(0, 0, 40, 100, blocks=0), None)], kv, 0, 9).any
    assert not room([(Report(0, 0, 40, 100, blocks=0), None)], kv, 0, 10).any
