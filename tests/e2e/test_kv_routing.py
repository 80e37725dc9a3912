"""KV-aware routing with real vLLM events: a repeated prefix returns to the worker that caches it."""

from __future__ import annotations

import random

import httpx
import pytest

from dynvllm.runtime import state
from tests.helpers import start_service, wait_workers


@pytest.fixture(scope="module")
def two_workers(agg_service):
    """The shared service: two workers behind a frontend with the kv router (the default)."""
    return agg_service


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
    fe = start_service(
        ["frontend"],
        tmp_path / "fe.log",
        "--router",
        "round-robin",
        namespace="e2e",
        nats_url=state.resolve_nats_url(None, "e2e"),
    )
    try:
        rr = fe.url
        wait_workers(fe, 2, timeout=60)
        prompt = list(range(3, 303))
        workers = {_complete(rr, prompt)[0] for _ in range(4)}
        assert len(workers) == 2
    finally:
        fe.stop()
