"""The simulated engine plugin: same frontend, router and KV-event path, no model computation."""

from __future__ import annotations

import random

import httpx

from dynvllm.cli.status import collect
from dynvllm.runtime import nats as natsrt
from dynvllm.runtime import state
from dynvllm.settings import build_settings
from tests.helpers import SIM, start_agg, wait_http


def test_sim_workers_emit_kv_events_that_steer_the_router(tiny_model, tmp_path):
    url, proc = start_agg(
        tiny_model,
        tmp_path / "sim.log",
        "sim4",
        "--router",
        "kv",
        "--block-size",
        "32",
        "--sim-decode-ms-per-step",
        "2",
        workers=4,
        engine_args=SIM,
    )
    try:
        wait_http(url + "/health", lambda b: b.get("workers") == 4, proc, timeout=180)
        rows = natsrt.run(
            collect(
                build_settings(
                    {"runtime": {"nats_url": state.resolve_nats_url(None, "sim4"), "namespace": "sim4"}}
                ),
                wait=0.6,
            )
        )
        assert len(rows) == 4
        rng = random.Random(3)
        prompts = [[rng.randrange(3, 500) for _ in range(200)] for _ in range(4)]
        first: dict[int, str] = {}
        for rnd in range(3):
            for i, p in enumerate(prompts):
                r = httpx.post(
                    url + "/v1/completions", json={"model": "tiny", "prompt": p, "max_tokens": 3}, timeout=30
                )
                assert r.status_code == 200, r.text
                worker = r.headers["x-dynvllm-worker"]
                cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
                assert r.json()["usage"]["completion_tokens"] == 3
                if rnd == 0:
                    first[i] = worker
                    assert cached == 0
                else:
                    assert worker == first[i] and cached == 192  # six full 32-token blocks
        assert len(set(first.values())) >= 2  # distinct prefixes spread over the idle workers
        # Streamed responses say where they went too (the headers leave with the first events).
        body = {"model": "tiny", "prompt": prompts[0], "max_tokens": 3, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
            assert r.headers["x-dynvllm-worker"] == first[0]
            assert r.headers["x-dynvllm-predicted-cached-tokens"] == "192"
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 4
    finally:
        proc.stop()


def test_http_workers_share_one_port_and_sum_their_metrics(tiny_model, tmp_path):
    """`--http-workers 2`: two frontend processes on one port, new connections spread over them,
    metrics summed across them, a killed one restarted."""
    import os
    import signal
    import time

    url, proc = start_agg(
        tiny_model,
        tmp_path / "httpw.log",
        "httpw",
        "--http-workers",
        "2",
        "--sim-decode-ms-per-step",
        "1",
        engine_args=SIM,
    )
    try:
        wait_http(url + "/health", lambda b: b.get("workers") == 1, proc, timeout=180)

        def pids(n: int) -> set[int]:
            seen = set()
            for _ in range(n):  # a new connection each time: the kernel picks a process
                with httpx.Client() as c:
                    try:
                        seen.add(c.get(url + "/live").json()["pid"])
                    except httpx.TransportError:
                        # A connection the kernel had queued on the killed process's socket is
                        # reset with it (SO_REUSEPORT keeps one accept queue per process).
                        continue
            return seen

        deadline = time.monotonic() + 60
        while len(served := pids(40)) < 2:  # both processes up and accepting
            assert time.monotonic() < deadline, served
        for i in range(20):
            r = httpx.post(
                url + "/v1/completions", json={"model": "tiny", "prompt": f"p {i}", "max_tokens": 3}
            )
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        metrics = httpx.get(url + "/metrics").text
        assert 'dynvllm_requests_total{model="tiny",status="200"} 20.0' in metrics  # summed over both
        victim = sorted(served)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while victim in (now := pids(20)) or len(now) < 2:  # replaced by a new process
            assert time.monotonic() < deadline, now
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "again", "max_tokens": 3})
        assert r.status_code == 200
    finally:
        assert proc.stop() == 0


def test_workers_without_kv_events_relay_none_and_the_engine_still_caches(tiny_model, tmp_path):
    url, proc = start_agg(
        tiny_model, tmp_path / "noev.log", "noev", "--no-kv-events", "--block-size", "32", engine_args=SIM
    )
    try:
        wait_http(url + "/health", lambda b: b.get("workers") == 1, proc, timeout=180)
        settings = build_settings(
            {"runtime": {"nats_url": state.resolve_nats_url(None, "noev"), "namespace": "noev"}}
        )
        (row,) = natsrt.run(collect(settings, wait=0.6))
        prompt = [random.Random(5).randrange(3, 500) for _ in range(200)]
        cached = []
        for _ in range(2):
            r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 3})
            assert r.status_code == 200, r.text
            cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        assert cached == [0, 192]  # the engine's prefix cache works as before
        metrics = httpx.get(f"http://{row['metrics']}/metrics").text
        relayed = [
            line for line in metrics.splitlines() if line.startswith("dynvllm_worker_kv_events_relayed")
        ]
        assert relayed and float(relayed[0].split()[-1]) == 0.0, relayed
    finally:
        proc.stop()
