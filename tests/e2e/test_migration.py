"""Resilience on real vLLM with two workers: readiness from the first moment (checked where the
shared service starts), and a stream whose worker is killed with SIGKILL continues on the other
worker with the same greedy text."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request

import openai
import pytest

from dynvllm.cli.status import worker_stats
from tests.helpers import wait_gone

NS = "e2e"
PROMPT = "the cat sees a dog and the old river runs"


@pytest.fixture(scope="module")
def service(agg_service):
    """The shared `serve agg --workers 2`, whose readiness from the first moment its fixture
    checks (a request sent the moment the model is listed succeeds)."""
    return agg_service


def _workers() -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "dynvllm", "status", "--json", "--namespace", NS],
        capture_output=True,
        text=True,
        check=True,
    )
    return [i for i in json.loads(out.stdout)["instances"] if i["component"] == "worker"]


def _busy_worker(workers: list[dict]) -> dict:
    from dynvllm.runtime import nats as natsrt

    async def main() -> dict:
        counts = [s["inflight"] for s in await asyncio.gather(*(worker_stats(w) for w in workers))]
        busy = [w for w, n in zip(workers, counts, strict=True) if n]
        assert len(busy) == 1, counts
        return busy[0]

    return natsrt.run(main())  # type: ignore[return-value]


def test_health_reports_roles(service):
    url, _ = service
    body = json.load(urllib.request.urlopen(url + "/health"))
    assert body["roles"] == {"tiny": {"agg": 2}} and body["models"] == ["tiny"]


def test_each_worker_serves_vllm_engine_metrics(service):
    workers = _workers()
    assert len(workers) == 2
    for w in workers:
        assert w["metrics"].split(":")[0] == w["address"].split(":")[0]
        text = urllib.request.urlopen(f"http://{w['metrics']}/metrics", timeout=5).read().decode()
        # vLLM's own engine metrics (re-exported from the worker's process) and dynvllm's.
        assert "vllm:kv_cache_usage_perc{" in text and "vllm:num_requests_running{" in text
        assert "vllm:prefix_cache_queries_total{" in text
        assert 'dynvllm_worker_kv_usage_ratio{model="tiny",role="agg"}' in text


def test_a_stream_survives_its_worker_being_killed(service):
    url, _ = service
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    tokens = 400
    kw = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    expected = client.completions.create(**kw).choices[0].text
    workers = _workers()
    stream = client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    text, finish, usage, killed = "", None, None, None
    for i, chunk in enumerate(stream):
        for c in chunk.choices:
            text += c.text
            finish = c.finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
        if i == 20:
            killed = _busy_worker(workers)
            os.kill(killed["pid"], signal.SIGKILL)
    assert killed is not None
    assert text == expected  # greedy: the same text as an uninterrupted run
    assert finish == "length" and usage.completion_tokens == tokens
    assert (
        usage.prompt_tokens
        == client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1).usage.prompt_tokens
    )
    metrics = urllib.request.urlopen(url + "/metrics").read().decode()
    assert 'dynvllm_migrations_total{model="tiny"} 1.0' in metrics
    assert not wait_gone([killed["pid"]], timeout=10)
    assert client.completions.create(model="tiny", prompt="after", max_tokens=2).choices[0].finish_reason
