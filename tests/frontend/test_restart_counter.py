"""The frontend's worker restart counter counts events, so it never goes down."""

from __future__ import annotations

import time

from prometheus_client import generate_latest

from dynvllm.frontend.metrics import FrontendMetrics


def value(m: FrontendMetrics) -> str:
    lines = [
        line
        for line in generate_latest(m.registry).decode().splitlines()
        if line.startswith("dynvllm_worker_restarts_total")
    ]
    return "\n".join(lines)


def test_each_restarted_instance_counts_once_and_the_count_stays():
    m = FrontendMetrics()
    live: list[tuple[str, str]] = [("tiny", "agg")]
    m.watch_workers(lambda: list(live))
    now = time.time()
    m.worker_registered("w1", "tiny", "agg", 0, now)  # a first start is no restart
    m.worker_registered("old", "tiny", "agg", 3, now - 3600)  # restarted before this frontend
    assert value(m) == ""
    m.worker_registered("w2", "tiny", "agg", 1, now + 1)
    m.worker_registered("w2", "tiny", "agg", 1, now + 1)  # seen again after a lease hiccup
    assert value(m) == 'dynvllm_worker_restarts_total{model="tiny",role="agg"} 1.0'
    live.clear()  # the restarted worker is gone; its slot's count was forgiven: still 1
    m.worker_registered("w3", "tiny", "agg", 1, now + 2)  # the slot's count restarted at 1
    m.worker_registered("p1", "tiny", "prefill", 2, now + 3)
    assert value(m).splitlines() == [
        'dynvllm_worker_restarts_total{model="tiny",role="agg"} 2.0',
        'dynvllm_worker_restarts_total{model="tiny",role="prefill"} 1.0',
    ]
    assert "dynvllm_workers{" not in generate_latest(m.registry).decode()
