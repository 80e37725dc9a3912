"""The worker's own Prometheus gauges and counters, read from its live state at each scrape."""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry, generate_latest

from dynvllm.worker.metrics import WorkerCollector, serve_metrics

STATE = {
    "inflight": 3,
    "running": 2,
    "waiting": 1,
    "kv_usage": 0.25,
    "draining": 0,
    "sleeping": 2,
    "restarts": 1,
    "prefix_queries": 640,
    "prefix_hits": 320,
    "kv_events_relayed": 12,
}
LABELS = '{model="tiny",role="agg"}'


def _scrape(state: dict) -> str:
    registry = CollectorRegistry()
    registry.register(WorkerCollector(lambda: state, {"model": "tiny", "role": "agg"}))
    return generate_latest(registry).decode()


def test_each_figure_is_exported_under_its_name_with_the_workers_labels():
    text = _scrape(STATE)
    for line in [
        f"dynvllm_worker_inflight_requests{LABELS} 3.0",
        f"dynvllm_worker_running_requests{LABELS} 2.0",
        f"dynvllm_worker_waiting_requests{LABELS} 1.0",
        f"dynvllm_worker_kv_usage_ratio{LABELS} 0.25",
        f"dynvllm_worker_draining{LABELS} 0.0",
        f"dynvllm_worker_sleeping{LABELS} 2.0",
        f"dynvllm_worker_restarts{LABELS} 1.0",
        f"dynvllm_worker_prefix_cache_queries_total{LABELS} 640.0",
        f"dynvllm_worker_prefix_cache_hits_total{LABELS} 320.0",
        f"dynvllm_worker_kv_events_relayed_total{LABELS} 12.0",
    ]:
        assert line in text.splitlines(), line
    assert "# TYPE dynvllm_worker_prefix_cache_hits_total counter" in text
    assert "# TYPE dynvllm_worker_inflight_requests gauge" in text


def test_values_are_read_at_scrape_time():
    state = dict(STATE)
    registry = CollectorRegistry()
    registry.register(WorkerCollector(lambda: state, {"model": "tiny", "role": "agg"}))
    assert f"dynvllm_worker_draining{LABELS} 0.0" in generate_latest(registry).decode()
    state["draining"] = 1
    assert f"dynvllm_worker_draining{LABELS} 1.0" in generate_latest(registry).decode()


def test_serve_metrics_answers_on_the_port_it_picked():
    from prometheus_client import REGISTRY

    collector = WorkerCollector(lambda: STATE, {"model": "served-by-test", "role": "agg"})
    server, port = serve_metrics("127.0.0.1", 0, collector)
    try:
        assert port > 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'dynvllm_worker_inflight_requests{model="served-by-test",role="agg"} 3.0' in text
    finally:
        server.shutdown()
        REGISTRY.unregister(collector)
