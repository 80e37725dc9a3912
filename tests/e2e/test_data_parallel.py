"""A data-parallel worker on real vLLM (`--data-parallel-size 2`: one worker, two engine ranks):
each rank's KV events reach the router, which targets (worker, rank); outputs equal one engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from dynvllm.runtime import state
from tests.helpers import (
    free_port,
    start_agg,
    start_service,
    stop_all,
    stop_in_background,
    wait_gone,
    wait_http,
    want_reference,
)

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


REFERENCE = want_reference("dp", [{"kind": "completion", "input": p, "params": PARAMS} for p in PROMPTS])


@pytest.fixture(scope="module")
def expected(references):
    return [texts[0] for texts in references[REFERENCE]]


@pytest.fixture(scope="module")
def service(tiny_model, tmp_path_factory, expected):
    log = tmp_path_factory.mktemp("dp") / "serve.log"
    url, proc = start_agg(tiny_model, log, NS, "--data-parallel-size", "2", "--router", "kv")
    try:
        wait_http(url + "/health", lambda b: b.get("workers") == 1, proc, timeout=400)
        yield url, proc
    finally:
        stop_in_background([proc])


def _complete(url: str, prompt: str) -> httpx.Response:
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompt, **PARAMS}, timeout=120)
    assert r.status_code == 200, r.text
    return r


# First in the module: `service` starts after it, so its engines do not idle beside these.
def test_headless_ranks_join_a_leader_and_are_routed(tiny_model, tmp_path, expected):
    """A leader with rank 0 (`--data-parallel-size 2 --data-parallel-size-local 1`) and a headless
    process with rank 1, as on two hosts: requests reach both ranks, and rank 1's KV events,
    relayed by the headless process in the leader's name, steer repeats back to it."""
    rpc = str(free_port())
    dp = ["--data-parallel-size", "2", "--data-parallel-size-local", "1"]
    dp += ["--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", rpc]
    url, leader = start_agg(tiny_model, tmp_path / "leader.log", "dph", *dp, "--router", "kv")
    head = None
    try:
        nats = None
        deadline = time.monotonic() + 60
        while nats is None:  # the leader records its NATS address once it has started it
            assert leader.p.poll() is None and time.monotonic() < deadline, leader.tail()
            try:
                nats = state.resolve_nats_url(None, "dph")
            except LookupError:
                time.sleep(0.1)
        head = start_service(
            ["serve", "agg"],
            tmp_path / "headless.log",
            "--no-frontend",
            "--headless",
            *dp,
            "--data-parallel-start-rank",
            "1",
            model=tiny_model,
            namespace="dph",
            nats_url=nats,
            http=False,
        )
        wait_http(url + "/health", lambda b: b.get("workers") == 1, leader, timeout=400)
        cmd = [sys.executable, "-m", "dynvllm", "status", "--json", "--namespace", "dph"]

        def engines() -> list:
            rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)[
                "instances"
            ]
            return [(r["component"], r["ranks"]) for r in rows if r["component"] == "engine"]

        deadline = time.monotonic() + 60
        while not engines():  # the headless ranks relay events once they have found their leader
            assert time.monotonic() < deadline and head.p.poll() is None, head.tail()
            time.sleep(0.2)
        first = {}
        for i, prompt in enumerate(PROMPTS):
            r = _complete(url, prompt)
            assert r.json()["choices"][0]["text"] == expected[i]
            first[i] = r.headers["x-dynvllm-rank"]
        assert set(first.values()) == {"0", "1"}
        time.sleep(1)  # KV events are asynchronous: let the last ones reach the router
        for i, prompt in enumerate(PROMPTS):
            r = _complete(url, prompt)
            seen = (i, r.headers["x-dynvllm-rank"], first[i], r.headers["x-dynvllm-predicted-cached-tokens"])
            assert seen[1] == seen[2] and int(seen[3]) >= 32, (seen, first)
        assert engines() == [("engine", 1)]
    finally:
        pids = [p.pid for p in (head.descendants() if head else [])]
        stop_all([p for p in (head, leader) if p is not None])
        assert not wait_gone(pids, timeout=20)


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
