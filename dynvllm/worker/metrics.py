"""The worker's own Prometheus endpoint: vLLM's engine metrics (registered by vLLM in the process's
default registry) plus dynvllm's worker gauges, read at scrape time so the request path pays
nothing for them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("dynvllm.worker")


class WorkerCollector:
    """Gauges and counters computed from the worker's live state at each scrape."""

    def __init__(self, read: Callable[[], dict[str, Any]], labels: dict[str, str]) -> None:
        self._read = read
        self._labels = labels

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self._read()
        names, values = list(self._labels), list(self._labels.values())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(values, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(values, value)
            return c

        yield gauge("dynvllm_worker_inflight_requests", "Requests this worker is serving", s["inflight"])
        yield gauge("dynvllm_worker_running_requests", "Requests the engine is running", s["running"])
        yield gauge("dynvllm_worker_waiting_requests", "Requests queued in the engine", s["waiting"])
        yield gauge("dynvllm_worker_kv_usage_ratio", "Share of KV-cache blocks in use (0-1)", s["kv_usage"])
        yield gauge("dynvllm_worker_draining", "1 while the worker drains before exit", s["draining"])
        yield gauge("dynvllm_worker_sleeping", "Sleep level of the engine (0: awake)", s["sleeping"])
        yield gauge(
            "dynvllm_worker_restarts",
            "Times `serve` restarted this worker slot after a crash",
            s["restarts"],
        )
        yield counter("dynvllm_worker_prefix_cache_queries", "Prompt tokens looked up", s["prefix_queries"])
        yield counter("dynvllm_worker_prefix_cache_hits", "Prompt tokens found cached", s["prefix_hits"])
        yield counter("dynvllm_worker_kv_events_relayed", "KV events sent to routers", s["kv_events_relayed"])


def serve_metrics(host: str, port: int, collector: WorkerCollector) -> tuple[Any, int]:
    """Serve the process registry (vLLM's metrics and ours) on a thread; returns (server, port)."""
    from prometheus_client import REGISTRY, start_http_server

    REGISTRY.register(collector)
    server, _ = start_http_server(port, addr=host, registry=REGISTRY)
    return server, server.server_address[1]
