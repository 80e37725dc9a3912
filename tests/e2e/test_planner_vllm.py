"""The planner on real vLLM: the local connector adds a worker to the shared service under load
and drains it after. A module of its own: it uses the session's shared engines (`agg_service`),
whose users run together in one test process, and the sim-engine planner tests need not."""

from __future__ import annotations

import json
import re
import time

import httpx

from dynvllm.planner.profile import Level, Point, Profile
from tests.e2e.test_planner import Load, metric
from tests.helpers import Proc, free_port, wait_workers


def routed(url: str) -> dict[str, float]:
    """Requests the frontend routed to each worker (by worker id)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(
            r'^dynvllm_routed_requests_total\{[^}]*worker="([^"]+)"[^}]*\} (\S+)$', text, re.M
        )
    }


def test_on_vllm_the_local_connector_adds_a_worker_under_load_and_drains_it_after(agg_service, tmp_path):
    """Real vLLM: the shared service's two tiny-model engines, a planner held to 2-3 workers with
    a profile of 2 req/s per worker. 5 req/s make it start a third engine through the local
    connector (the `serve` supervisor), which then serves a share of them; once the load stops,
    one worker drains and leaves. Every request is answered in full. The service ends as it
    began, with two workers."""
    url, serve = agg_service
    wait_workers(serve, 2, timeout=120)  # a worker another module killed is back
    profile = tmp_path / "profile.json"
    level = Level(concurrency=4, request_rate=2.0, ttft_p50=0.05, ttft_p90=0.1, itl_p50=0.01, itl_p90=0.02)
    profile.write_text(json.dumps(Profile({"agg": [Point(16, 8, [level])]}).to_dict()))
    port = free_port()
    plan = Proc(
        [
            "planner", "--namespace", "e2e", "--frontend-url", url, "--planner-profile", str(profile),
            "--planner-interval", "1", "--predictor", "constant", "--cooldown", "2",
            "--scale-down-after", "2", "--min-workers", "2", "--max-workers", "3",
            # The load below is evenly spaced, not Poisson: 5 a second, 1 over the two workers'
            # capacity, is no noise to discount.
            "--planner-noise-band", "0", "--planner-metrics-port", str(port),
        ],
        tmp_path / "planner.log",
    )  # fmt: skip
    planner_url = f"http://127.0.0.1:{port}"
    before, left = routed(url), serve.tail(200000).count("drained and left")
    load = Load(url)
    try:
        load.rate = 5.0  # 2.5 workers' worth
        wait_workers(serve, 3, timeout=150)
        deadline = time.monotonic() + 30
        while not any(n > 0 for w, n in routed(url).items() if w not in before):
            assert time.monotonic() < deadline, "the new worker got no request"
            time.sleep(0.3)
        load.rate = 0.0
        wait_workers(serve, 2, timeout=60)
        deadline = time.monotonic() + 60
        while serve.tail(200000).count("drained and left") == left:
            assert time.monotonic() < deadline and serve.p.poll() is None, serve.tail() + plan.tail()
            time.sleep(0.3)
        decisions = metric(planner_url, "dynvllm_planner_decisions_total", '{action="up",role="agg"}')
        assert decisions == 1, plan.tail()
        assert metric(planner_url, "dynvllm_planner_decisions_total", '{action="down",role="agg"}') == 1
    finally:
        load.close()
        plan.stop()
    assert len(load.statuses) > 20 and set(load.statuses) == {200}, load.statuses
