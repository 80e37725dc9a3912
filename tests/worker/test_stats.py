"""Scheduler statistics the worker keeps for load reports, health and its metrics endpoint."""

from __future__ import annotations

from types import SimpleNamespace

from dynvllm.worker.stats import SchedulerSnapshot, stat_logger_factory


def test_ranks_sum_their_queues_and_average_their_kv_usage():
    s = SchedulerSnapshot()
    s.set_rank(0, running=2, waiting=1, kv_usage=0.5)
    s.set_rank(1, running=3, waiting=0, kv_usage=0.25)
    assert (s.running, s.waiting, s.kv_usage) == (5, 1, 0.375)
    s.set_rank(0, running=0, waiting=0, kv_usage=0.0)  # a rank's new figures replace its old ones
    assert (s.running, s.waiting, s.kv_usage) == (3, 0, 0.125)


def test_ranks_view_is_keyed_by_rank_in_numeric_order():
    s = SchedulerSnapshot()
    s.set_rank(10, 1, 2, 0.5)
    s.set_rank(2, 3, 4, 0.25)
    view = s.ranks_view()
    assert list(view) == ["2", "10"]
    assert view["10"] == {"running": 1, "waiting": 2, "kv_usage": 0.5}


def test_connector_series_are_counted_and_summed_wherever_they_nest():
    s = SchedulerSnapshot()
    s.add_connector_stats(
        {
            "bytes_transferred": [100, 50],
            "nixl": {"transfer_duration": [0.5, 0.25], "label": "ucx"},
            "mixed": [1, "not a number"],
        }
    )
    s.add_connector_stats(SimpleNamespace(data={"bytes_transferred": [10]}))  # a stats object
    assert s.kv_transfer == {"bytes_transferred": [3, 160.0], "transfer_duration": [2, 0.75]}


def test_the_stat_logger_copies_each_step_into_the_snapshot():
    s = SchedulerSnapshot()
    logger = stat_logger_factory(s)(None, engine_index=1)
    step = SimpleNamespace(
        num_running_reqs=4,
        num_waiting_reqs=2,
        kv_cache_usage=0.5,
        prefix_cache_stats=SimpleNamespace(queries=64, hits=32),
        kv_connector_stats={"bytes_transferred": [8]},
    )
    logger.record(step, None)
    logger.record(step, None)
    assert s.ranks_view() == {"1": {"running": 4, "waiting": 2, "kv_usage": 0.5}}
    assert (s.prefix_queries, s.prefix_hits) == (128, 64)  # counters accumulate over steps
    assert s.kv_transfer == {"bytes_transferred": [2, 16.0]}
    assert s.updated > 0
    before = s.updated
    logger.record(None, None)  # steps without scheduler stats change nothing
    assert s.updated == before and s.prefix_queries == 128
