"""Prometheus metrics of the frontend (one registry per app, so tests can start several)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LAT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: Whole requests: long generations take minutes.
_E2E = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class FrontendMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dynvllm_requests", "HTTP inference requests by model and status", ["model", "status"], registry=r
        )
        self.inflight = Gauge(
            "dynvllm_inflight_requests",
            "Requests in progress",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",  # summed over --http-workers processes
        )
        # Read by the planner: a request held for a known model with no ready worker asks for one
        # (how a model scaled to zero comes back).
        self.waiting_for_worker = Gauge(
            "dynvllm_requests_waiting_for_worker",
            "Requests waiting for a worker of a known model that has none ready",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self._live: list[Any] = []
        self.ttft = Histogram(
            "dynvllm_time_to_first_token_seconds", "Time to first token", ["model"], buckets=_LAT, registry=r
        )
        self.itl = Histogram(
            "dynvllm_inter_token_latency_seconds",
            "Time between streamed tokens",
            ["model"],
            buckets=_LAT,
            registry=r,
        )
        self.request_duration = Histogram(
            "dynvllm_request_duration_seconds",
            "Requests from arrival to the end of the answer (or their refusal at admission), by model "
            "and status",
            ["model", "status"],
            buckets=_E2E,
            registry=r,
        )
        self.output_tokens = Counter("dynvllm_output_tokens", "Generated tokens", ["model"], registry=r)
        self.prompt_tokens = Counter("dynvllm_prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.cached_tokens = Counter(
            "dynvllm_cached_prompt_tokens", "Prompt tokens served from a prefix cache", ["model"], registry=r
        )
        self.migrations = Counter(
            "dynvllm_migrations",
            "Streams moved to another worker after theirs was lost",
            ["model"],
            registry=r,
        )
        self._stages: dict[str, Counter] = {}
        self._children: dict[tuple, Any] = {}
        self.routed = Counter(
            "dynvllm_routed_requests", "Requests routed to each worker", ["model", "worker"], registry=r
        )
        # Counted by each frontend process from discovery, like the worker gauges: a plain
        # Counter would be summed over --http-workers processes that each saw the same restart.
        self.restarts = _Restarts()
        self._live.append(self.restarts)
        r.register(self.restarts)
        self._since = time.time()
        self._restarted: set[str] = set()

    def of(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: prometheus_client takes a lock and builds a key on
        every labels() call, and the request path would make a dozen per request."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def worker_registered(
        self, instance_id: str, model: str, role: str, restarts: int, started: float
    ) -> None:
        """Count a worker that `serve` restarted (its card's `restarts` > 0) once, when its new
        instance registers. One that started before this process did is not counted: that restart
        happened before this counter began (a frontend restart resets counters, as Prometheus
        expects). Counted from events, not read from live cards, so it never goes down when a
        worker leaves or a slot's restart count is forgiven."""
        if restarts <= 0 or started < self._since or instance_id in self._restarted:
            return
        self._restarted.add(instance_id)
        key = (model, role)
        self.restarts.counts[key] = self.restarts.counts.get(key, 0) + 1

    def watch_workers(self, rows: Callable[[], Iterable[tuple[str, str]]]) -> None:
        """Worker gauges read from discovery at scrape time: `rows()` yields (model, role) per
        live worker."""
        gauges = _WorkerGauges(rows)
        self._live.append(gauges)
        self.registry.register(gauges)

    def stage(self, name: str, help_text: str) -> Counter:
        """The outcome counter a stage declares (created when the stage first runs)."""
        counter = self._stages.get(name)
        if counter is None:
            counter = Counter(
                name, help_text or f"{name} by outcome", ["model", "outcome"], registry=self.registry
            )
            self._stages[name] = counter
        return counter

    def render(self) -> bytes:
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not folder:
            return generate_latest(self.registry)
        # Several frontend processes: request metrics summed from every process's files; the
        # discovery gauges are the same in each, so this process's own are shown.
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, folder)
        for collector in self._live:
            merged.register(collector)
        return generate_latest(merged)


class _WorkerGauges:
    def __init__(self, rows: Callable[[], Iterable[tuple[str, str]]]) -> None:
        self._rows = rows

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        count: dict[tuple[str, str], int] = {}
        for model, role in self._rows():
            count[(model, role)] = count.get((model, role), 0) + 1
        workers = GaugeMetricFamily(
            "dynvllm_workers", "Live workers by model and role", labels=["model", "role"]
        )
        for key in sorted(count):
            workers.add_metric(list(key), count[key])
        yield workers


class _Restarts:
    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "dynvllm_worker_restarts",
            "Workers that came back after `serve` restarted them following a crash",
            labels=["model", "role"],
        )
        for key, n in sorted(self.counts.items()):
            family.add_metric(list(key), n)
        yield family
