"""Scheduler statistics from vLLM's stat-logger hook, kept for load metrics and health."""

from __future__ import annotations

import time
from typing import Any


class SchedulerSnapshot:
    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        self.updated = 0.0
        self.prefix_queries = 0
        self.prefix_hits = 0
        # KV-connector counters (e.g. NIXL transfers), summed over engine steps: key -> [count, sum].
        self.kv_transfer: dict[str, list[float]] = {}
        #: Data-parallel rank -> (running, waiting, kv_usage); the fields above sum (or average) them.
        self.per_rank: dict[int, tuple[int, int, float]] = {}

    def set_rank(self, rank: int, running: int, waiting: int, kv_usage: float) -> None:
        self.per_rank[rank] = (running, waiting, kv_usage)
        values = self.per_rank.values()
        self.running = sum(v[0] for v in values)
        self.waiting = sum(v[1] for v in values)
        self.kv_usage = sum(v[2] for v in values) / len(self.per_rank)

    def ranks_view(self) -> dict[str, dict]:
        return {
            str(r): {"running": v[0], "waiting": v[1], "kv_usage": v[2]}
            for r, v in sorted(self.per_rank.items())
        }

    def add_connector_stats(self, stats: Any) -> None:
        """Accumulate every numeric series a connector reports, whatever its name or nesting."""
        if isinstance(stats, dict):
            for key, value in stats.items():
                if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
                    entry = self.kv_transfer.setdefault(str(key), [0, 0.0])
                    entry[0] += len(value)
                    entry[1] += float(sum(value))
                else:
                    self.add_connector_stats(value)
        elif hasattr(stats, "data"):
            self.add_connector_stats(stats.data)


def stat_logger_factory(snapshot: SchedulerSnapshot) -> Any:
    """A vLLM StatLoggerFactory that copies each engine step's scheduler stats into `snapshot`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Logger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.rank = engine_index

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            if scheduler_stats is None:
                return
            snapshot.set_rank(
                self.rank,
                scheduler_stats.num_running_reqs,
                scheduler_stats.num_waiting_reqs,
                scheduler_stats.kv_cache_usage,
            )
            pcs = getattr(scheduler_stats, "prefix_cache_stats", None)
            if pcs is not None:
                snapshot.prefix_queries += getattr(pcs, "queries", 0)
                snapshot.prefix_hits += getattr(pcs, "hits", 0)
            if getattr(scheduler_stats, "kv_connector_stats", None):
                snapshot.add_connector_stats(scheduler_stats.kv_connector_stats)
            snapshot.updated = time.time()

        def log_engine_initialized(self) -> None:
            pass

    return _Logger
