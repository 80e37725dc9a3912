"""Several frontends on one NATS (sim engine): they route the same prompt alike under load, and one
started after the traffic loads a live peer's index and predicts the same cached prefixes."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import time

import httpx
import pytest

from dynvllm.runtime import state
from tests.helpers import SIM, start_agg, start_service, stop_all, wait_workers

NS = "replicas"
SYSTEMS = [[random.Random(s).randrange(3, 500) for _ in range(320)] for s in range(16)]  # 10 blocks each


@pytest.fixture(scope="module")
def frontends(tiny_model, tmp_path_factory):
    """`serve agg` with 4 sim workers (frontend A) and a second `dynvllm frontend` (B)."""
    logs = tmp_path_factory.mktemp("replicas")
    _, a = start_agg(
        tiny_model, logs / "serve.log", NS, "--router", "kv", "--block-size", "32", workers=4, engine_args=SIM
    )
    procs = [a]
    try:
        wait_workers(a, 4, timeout=120)
        b = start_service(
            ["frontend"], logs / "b.log", namespace=NS, nats_url=state.resolve_nats_url(None, NS)
        )
        procs.append(b)
        wait_workers(b, 4, timeout=60)
        yield a, b, logs, procs
    finally:
        stop_all(procs)


async def _post(
    client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int = 1
) -> httpx.Response:
    r = await client.post(
        url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens}
    )
    assert r.status_code == 200, r.text
    return r


def _cached(r: httpx.Response) -> int:
    return int(r.headers["x-dynvllm-predicted-cached-tokens"])


def _question(rng: random.Random) -> list[int]:
    return SYSTEMS[rng.randrange(len(SYSTEMS))] + [rng.randrange(3, 500) for _ in range(32)]


async def _background(client, urls: list[str], stop: asyncio.Event, seed: int) -> int:
    """Requests of about half a second each (48 tokens at the sim engine's 10 ms a step)."""
    rng, sent = random.Random(seed), 0
    while not stop.is_set():
        await _post(client, urls[sent % len(urls)], _question(rng), 48)
        sent += 1
    return sent


PROBES = 100


def test_frontends_send_the_same_prompt_to_the_same_worker_under_load(frontends):
    a, b, _, _ = frontends

    async def main() -> tuple[int, int, int]:
        async with httpx.AsyncClient(timeout=60) as client:
            for s in SYSTEMS:  # each system prompt cached somewhere
                await _post(client, a.url, s)
            stop = asyncio.Event()
            streams = [asyncio.create_task(_background(client, [a.url, b.url], stop, i)) for i in range(3)]
            await asyncio.sleep(0.5)
            rng, agreed, differed = random.Random(99), 0, []
            for _ in range(PROBES):
                prompt = _question(rng)
                ra, rb = await asyncio.gather(_post(client, a.url, prompt), _post(client, b.url, prompt))
                if ra.headers["x-dynvllm-worker"] == rb.headers["x-dynvllm-worker"]:
                    agreed += 1
                else:  # what each saw: the worker and the cached tokens it predicted there
                    differed.append([(r.headers["x-dynvllm-worker"][-6:], _cached(r)) for r in (ra, rb)])
                await asyncio.sleep(0.03)
            stop.set()
            return agreed, PROBES, sum(await asyncio.gather(*streams)), differed

    agreed, probes, background, differed = asyncio.run(main())
    assert background >= 12  # there was load
    # Unshared, two frontends agree on ~55% of pairs; shared, 97-100%. The 95% goal is measured by
    # scripts/bench_replicas.py over thousands of pairs; here a bound that separates the two
    # without failing on the sampling noise of 100 pairs.
    assert agreed >= 0.9 * probes, f"{agreed} of {probes} pairs agreed; differed: {differed}"


def test_a_frontend_started_late_routes_warm_within_seconds(frontends, tiny_model):
    """Started after the traffic (with some still flowing while it starts), the new frontend predicts
    the cached prefix of the warm prompts as the warm frontend does from its first answer on. Cold,
    it would know only what the traffic since its start told it: engines send no events for blocks
    they already hold. The index is ready within seconds: the frontend serves only once it has
    loaded a peer's index, and says how long that took (from subscribing to the events to the last
    one held back meanwhile applied); the process's own start (interpreter, imports), which a busy
    machine stretches, is bounded apart."""
    a, b, logs, procs = frontends

    async def predicted(client, url: str, tail: int) -> int:
        rs = [await _post(client, url, s + [tail] * 32) for s in SYSTEMS]
        return sum(_cached(r) for r in rs)

    async def main() -> tuple[int, int, float]:
        async with httpx.AsyncClient(timeout=60) as client:
            stop = asyncio.Event()
            streams = [
                asyncio.create_task(_background(client, [a.url, b.url], stop, 10 + i)) for i in range(2)
            ]
            t0 = time.monotonic()
            c = start_service(
                ["frontend"], logs / "c.log", namespace=NS, nats_url=state.resolve_nats_url(None, NS)
            )
            procs.append(c)
            assert c.url
            while True:
                try:
                    if (await client.get(c.url + "/health")).json().get("workers") == 4:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() - t0 < 30, c.tail()
                await asyncio.sleep(0.05)
            serving = time.monotonic() - t0
            # The traffic ran through the bootstrap (its events were buffered, then cut over); it
            # stops here so that both frontends are asked with the same load (none).
            stop.set()
            await asyncio.gather(*streams)
            new = await predicted(client, c.url, 7)
            warm = await predicted(client, a.url, 8)
            return new, warm, serving

    new, warm, serving = asyncio.run(main())
    assert warm >= 16 * 320 * 0.95, warm  # the warm frontend finds (nearly) every system prompt
    assert abs(new - warm) <= 0.05 * warm, (new, warm)
    loaded = re.search(
        r"index loaded from a peer frontend: (\d+) blocks on \d+ workers in ([\d.]+) s", procs[-1].tail()
    )
    assert loaded and int(loaded.group(1)) >= 16 * 10, procs[-1].tail()
    print(loaded.group(0), f"; serving {serving:.1f} s after its start")  # shown with -rP
    assert float(loaded.group(2)) < 5.0, (loaded.group(0), f"serving {serving:.1f} s after its start")


def test_killing_one_of_three_frontends_under_load_fails_no_request_of_a_retrying_client(frontends):
    """A client (or gateway) that sends a request whose connection broke to another frontend sees
    no failure when a frontend is SIGKILLed under load: the survivors route on (their routing state
    does not wait for the dead one), and each broken attempt fails within the 2 s failover goal, kill
    included. Runs last: it ends frontend C, started by the test above (or here)."""
    a, b, logs, procs = frontends
    if len(procs) < 3:
        procs.append(
            start_service(
                ["frontend"], logs / "c.log", namespace=NS, nats_url=state.resolve_nats_url(None, NS)
            )
        )
        wait_workers(procs[-1], 4, timeout=60)
    c = procs[-1]
    urls = [a.url, b.url, c.url]
    live = list(urls)
    done: list[tuple[float, float, int, int]] = []  # (start, seconds, attempts, tokens)
    failovers: list[float] = []  # seconds from a request's start until its broken attempt failed
    failed: list[str] = []
    killed_at: list[float] = []

    async def one(client: httpx.AsyncClient, rng: random.Random, turn: int) -> None:
        prompt, t0, attempts = _question(rng), time.monotonic(), 0
        while attempts < 3:
            url = live[(turn + attempts) % len(live)]
            attempts += 1
            try:
                r = await client.post(
                    url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 16}
                )
            except httpx.TransportError:
                failovers.append(time.monotonic() - t0)
                if url in live and len(live) > 1:
                    live.remove(url)  # refused or reset: this client stops sending there
                continue
            if r.status_code != 200:
                failed.append(f"{r.status_code} {r.text[:200]}")
                return
            done.append((t0, time.monotonic() - t0, attempts, r.json()["usage"]["completion_tokens"]))
            return
        failed.append(f"no frontend answered after {attempts} attempts")

    async def loop(client: httpx.AsyncClient, seed: int, stop: asyncio.Event) -> None:
        rng, turn = random.Random(seed), seed
        while not stop.is_set():
            await one(client, rng, turn)
            turn += 1

    async def main() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            stop = asyncio.Event()
            tasks = [asyncio.create_task(loop(client, 100 + i, stop)) for i in range(12)]
            await asyncio.sleep(1.5)
            killed_at.append(time.monotonic())
            c.signal(signal.SIGKILL)
            await asyncio.sleep(3.0)
            stop.set()
            await asyncio.gather(*tasks)

    asyncio.run(main())
    kill = killed_at[0]
    after = [d for d in done if d[0] >= kill]
    retried = [d for d in done if d[2] > 1]
    assert not failed, failed
    assert all(d[3] == 16 for d in done)
    assert retried, "no request met the dead frontend: the kill was not under load"
    assert len(after) >= 30, f"{len(after)} requests answered after the kill"  # the survivors serve on
    # The goal bounds the failover (learning the frontend is gone); the retry itself is a request
    # like any other, as slow as this loaded host serves them.
    failover = max(failovers)
    assert failover <= 2.0, f"a broken attempt took {failover:.2f} s to fail"
    slowest, served = max(d[1] for d in retried), max(d[1] for d in done if d[2] == 1)
    assert slowest <= 2.0 + served, f"a retried request took {slowest:.2f} s (others up to {served:.2f} s)"
    print(
        f"{len(done)} ok, {len(retried)} retried (slowest {slowest:.2f} s, failover {failover:.2f} s,"
        f" others up to {served:.2f} s), {len(after)} after the kill"
    )
