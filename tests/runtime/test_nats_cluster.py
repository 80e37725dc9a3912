"""NATS as the Kubernetes manifests run it: the StatefulSet's three servers with cluster routes
and clustered JetStream (deploy/k8s/base/nats.yaml, run by tests/k8s_local.py as local
nats-server processes). The server most clients use is killed under load: no request fails, a
worker that starts afterwards is discovered, and KV events still reach the router."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import httpx
import yaml

from tests.helpers import SIM, start_service, stop_all, wait_gone, wait_http, wait_workers
from tests.k8s_local import NatsCluster

NATS_YAML = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "base" / "nats.yaml"
STEP = ("--sim-decode-ms-per-step", "20")


async def load(url: str, stop: asyncio.Event, results: list, clients: int = 4) -> None:
    """`clients` loops of streamed chat requests (16 tokens each) until `stop`."""

    async def one(client: httpx.AsyncClient, i: int) -> None:
        n = 0
        while not stop.is_set():
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"client {i} request {n}"}],
                "max_tokens": 16,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            n += 1
            try:
                async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                    lines = [ln async for ln in r.aiter_lines() if ln.startswith("data: ")]
                usage = [ln for ln in lines if '"usage":{' in ln]
                ok = (
                    r.status_code == 200
                    and lines[-1] == "data: [DONE]"
                    and '"completion_tokens":16' in usage[-1]
                )
                results.append((time.monotonic(), ok, r.status_code if not ok else 200, lines[-2:]))
            except Exception as exc:  # a failed request is a result, not a crash of the load
                results.append((time.monotonic(), False, repr(exc), []))

    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(one(client, i) for i in range(clients)))


def predicted_cached(url: str, prompt: list[int]) -> tuple[str, str]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2}
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.headers["x-dynvllm-worker"], r.headers["x-dynvllm-predicted-cached-tokens"]


def test_a_nats_server_lost_under_load_fails_no_request(tiny_model, tmp_path):
    docs = [d for d in yaml.safe_load_all(NATS_YAML.read_text()) if d]
    cluster = NatsCluster(docs, tmp_path)
    assert cluster.replicas == 3
    procs = []
    try:
        cluster.start()
        urls = ",".join(cluster.urls)
        front = start_service(
            ["serve", "agg"],
            tmp_path / "serve.log",
            "--router",
            "kv",
            "--block-size",
            "32",
            *STEP,
            model=tiny_model,
            namespace="natsha",
            nats_url=urls,
            workers=2,
            engine_args=SIM,
        )
        procs.append(front)
        url = front.url
        assert url
        wait_workers(front, 2, timeout=120)
        # The server with the most clients (the frontend's, the workers') is the one to lose.
        victim = max(range(3), key=cluster.client_count)
        assert cluster.client_count(victim) >= 1

        async def run() -> list:
            results: list = []
            stop = asyncio.Event()
            task = asyncio.create_task(load(url, stop, results))
            await asyncio.sleep(2)
            killed_at = time.monotonic()
            cluster.kill(victim)
            await asyncio.sleep(5)
            stop.set()
            await task
            return [killed_at, results]

        killed_at, results = asyncio.run(run())
        failed = [r for r in results if not r[1]]
        after = [r for r in results if r[0] > killed_at]
        assert not failed, failed[:5]
        assert len(after) >= 4, (len(results), len(after))  # requests kept completing after the kill
        # Clients moved to the two servers left; the JetStream cluster kept a leader.
        survivors = [i for i in range(3) if i != victim]
        assert sum(cluster.client_count(i) for i in survivors) >= 3
        cluster.wait_meta_leader()
        health = wait_http(url + "/health", lambda b: b.get("workers") == 2, front, timeout=10)
        assert health["workers"] == 2  # no worker lost its registration over the switch

        # Discovery: a worker started after the loss joins through the survivors.
        extra = start_service(
            ["serve", "agg"],
            tmp_path / "extra.log",
            "--no-frontend",
            *STEP,
            model=tiny_model,
            namespace="natsha",
            nats_url=",".join(cluster.url(i) for i in survivors),
            engine_args=SIM,
            http=False,
        )
        procs.append(extra)
        wait_workers(front, 3, timeout=90)

        # KV events: a new prefix, cached on one worker, is predicted as cached on the second
        # request: the worker's events crossed the cluster to the router after the loss.
        prompt = [random.Random(5).randrange(3, 500) for _ in range(200)]
        worker, cached = predicted_cached(url, prompt)
        assert cached == "0"
        deadline = time.monotonic() + 30
        while (got := predicted_cached(url, prompt)) != (worker, "192") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert got == (worker, "192")  # six full 32-token blocks
    finally:
        pids = [p.pid for proc in procs for p in [proc.ps, *proc.descendants()]]
        stop_all(procs)
        cluster.stop()
    assert not wait_gone(pids)
