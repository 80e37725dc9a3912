"""A data-parallel worker on real vLLM (`--data-parallel-size 2`: one worker, two engine ranks):
each rank's KV events reach the router, which targets (worker, rank); outputs equal one engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from tests.helpers import offline_reference, start_agg, wait_http

NS = "dp"
WORDS = [
    "the",
    "cat",
    "sees",
    "a",
    "dog",
    "and",
    "the",
    "old",
    "river",
    "runs",
    "past",
    "a",
    "tree",
    "where",
    "birds",
    "sing",
]
PROMPTS = [" ".join(WORDS[i:] + WORDS[:i]) * 3 for i in range(4)]  # distinct prefixes, 2+ blocks
PARAMS = {"max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def expected(tiny_model):
    reqs = [{"kind": "completion", "input": p, "params": PARAMS} for p in PROMPTS]
    return [texts[0] for texts in offline_reference(tiny_model, reqs)]


@pytest.fixture(scope="module")
def service(tiny_model, tmp_path_factory, expected):
    log = tmp_path_factory.mktemp("dp") / "serve.log"
    url, proc = start_agg(tiny_model, log, NS, "--data-parallel-size", "2", "--router", "kv")
    try:
        wait_http(url + "/health", lambda b: b.get("workers") == 1, proc, timeout=400)
        yield url, proc
    finally:
        proc.stop()


def _complete(url: str, prompt: str) -> httpx.Response:
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompt, **PARAMS}, timeout=120)
    assert r.status_code == 200, r.text
    return r


def test_requests_target_ranks_and_return_to_the_rank_that_caches_them(service, expected):
    url, _ = service
    first = {}
    for i, prompt in enumerate(PROMPTS):
        r = _complete(url, prompt)
        assert r.json()["choices"][0]["text"] == expected[i]  # token for token, like one engine
        first[i] = r.headers["x-dynvllm-rank"]
    assert set(first.values()) == {"0", "1"}  # idle ranks share new prefixes
    for i, prompt in enumerate(PROMPTS):
        r = _complete(url, prompt)
        assert r.json()["choices"][0]["text"] == expected[i]
        # The router saw this rank's KV events (rank 1 publishes on the base port + 1) ...
        assert r.headers["x-dynvllm-rank"] == first[i]
        predicted = int(r.headers["x-dynvllm-predicted-cached-tokens"])
        # ... and the rank really had the prefix cached, as predicted.
        cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert predicted >= 32 and cached == predicted


def test_status_counts_ranks_and_folds_to_a_narrow_terminal(service):
    def status(*args: str) -> str:
        cmd = [sys.executable, "-m", "dynvllm", "status", "--namespace", NS, *args]
        env = {**os.environ, "COLUMNS": "60"}
        return subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout

    workers = [i for i in json.loads(status("--json"))["instances"] if i["component"] == "worker"]
    assert [w["ranks"] for w in workers] == [2]
    assert "…" not in status()  # cells fold onto more lines; nothing is cut short
