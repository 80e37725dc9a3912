"""KV-aware routing with real vLLM events: a repeated prefix returns to the worker that caches it."""

from __future__ import annotations

import random

import httpx
import pytest

from dynvllm.runtime import state
from tests.helpers import ENGINE_ARGS, Proc, free_port, wait_http


@pytest.fixture(scope="module")
def two_workers(tiny_model, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("kv") / "serve.log"
    proc = Proc(
        [
            "serve",
            "agg",
            "--model",
            str(tiny_model),
            "--served-model-name",
            "tiny",
            "--workers",
            "2",
            "--router",
            "kv",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(port),
            "--namespace",
            "kv2",
            *ENGINE_ARGS,
        ],
        log,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", lambda b: b.get("workers") == 2, proc, timeout=400)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.stop()


def _complete(url: str, prompt: list[int]) -> tuple[str, int, str]:
    r = httpx.post(
        url + "/v1/completions",
        json={"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    return (
        r.headers["x-dynvllm-worker"],
        body["usage"]["prompt_tokens_details"]["cached_tokens"],
        r.headers["x-dynvllm-predicted-cached-tokens"],
    )


def test_same_prefix_lands_on_the_caching_worker(two_workers):
    url, _ = two_workers
    rng = random.Random(1)
    a = [rng.randrange(3, 500) for _ in range(300)]
    b = [rng.randrange(3, 500) for _ in range(300)]
    first_a = _complete(url, a)
    assert first_a[1] == 0
    first_b = _complete(url, b)
    for _ in range(3):
        wa, cached_a, predicted_a = _complete(url, a)
        wb, cached_b, _ = _complete(url, b)
        assert wa == first_a[0] and wb == first_b[0]
        assert cached_a == 288 and cached_b == 288  # nine full 32-token blocks of 300
        assert predicted_a == "288"
    # A prompt sharing a's first 200 tokens goes where a's blocks are.
    w, cached, _ = _complete(url, a[:200] + [7] * 50)
    assert w == first_a[0] and cached == 192


def test_round_robin_frontend_on_the_same_workers_spreads_them(two_workers, tmp_path):
    _url, _ = two_workers
    port = free_port()
    fe = Proc(
        [
            "frontend",
            "--nats-url",
            state.resolve_nats_url(None, "kv2"),
            "--namespace",
            "kv2",
            "--router",
            "round-robin",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(port),
        ],
        tmp_path / "fe.log",
    )
    try:
        rr = f"http://127.0.0.1:{port}"
        wait_http(rr + "/health", lambda b: b.get("workers") == 2, fe, timeout=60)
        prompt = list(range(3, 303))
        workers = {_complete(rr, prompt)[0] for _ in range(4)}
        assert len(workers) == 2
    finally:
        fe.stop()
