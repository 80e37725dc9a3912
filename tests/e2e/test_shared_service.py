"""A shared service on simulated workers: tenants' limits, the admission queue's priorities and a
worker restart that clients do not notice."""

from __future__ import annotations

import asyncio
import re
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from dynvllm.frontend.quota_shares import bound
from dynvllm.frontend.tenants import TenantSpec, TokenBucket
from dynvllm.runtime.state import resolve_nats_url
from tests.helpers import SIM, start_agg, start_service, stop_all, wait_http

TENANTS = """
tenants:
  heavy:
    keys: [k-heavy]
    requests_per_second: 5
  light:
    keys: [k-light]
    requests_per_second: 5
  free:
    keys: [k-free]
  narrow:
    keys: [k-narrow]
    models: ["other-*"]
"""


@pytest.fixture(scope="module")
def service(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("shared")
    (folder / "tenants.yaml").write_text(TENANTS)
    url, proc = start_agg(
        tiny_model,
        folder / "serve.log",
        "shared",
        "--tenants-file",
        str(folder / "tenants.yaml"),
        # Saturated by the worker's own reports: its engine runs 2 sequences and may queue none.
        "--admission-max-waiting",
        "0",
        "--admission-timeout",
        "30",
        "--sim-decode-ms-per-step",
        "20",
        "--sim-max-num-seqs",
        "2",
        engine_args=SIM,
    )
    try:
        wait_http(url + "/health", lambda b: b.get("workers") == 1, proc, timeout=120)
        yield url, proc
    finally:
        proc.stop()


def body(i: int, max_tokens: int = 2, **extra) -> dict:
    return {"model": "tiny", "prompt": f"request number {i}", "max_tokens": max_tokens, **extra}


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def _ttft(c: httpx.AsyncClient, i: int, key: str, max_tokens: int = 2, **extra) -> float:
    """Seconds to the first streamed token of one completion (all of it read, [DONE] checked)."""
    start = time.monotonic()
    headers = {**auth(key), **extra.pop("headers", {})}
    req = body(i, max_tokens=max_tokens, stream=True, **extra)
    async with c.stream("POST", "/v1/completions", json=req, headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        first = None
        lines = []
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.monotonic() - start
            lines.append(line)
        assert [x for x in lines if x][-1] == "data: [DONE]"
    assert first is not None
    return first


def test_a_tenant_flooding_at_ten_times_its_rate_gets_429s_and_a_light_one_keeps_its_ttft(service):
    url, _ = service

    sent: list[float] = []
    heavy: list[httpx.Response] = []

    async def flood() -> float:
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=200)) as c:
            tasks = []
            start = time.monotonic()
            for i in range(125):  # 50 requests a second for 2.5 s: ten times its 5 a second
                sent.append(time.monotonic())
                tasks.append(
                    asyncio.create_task(c.post("/v1/completions", json=body(i), headers=auth("k-heavy")))
                )
                await asyncio.sleep(max(0.0, start + (i + 1) / 50 - time.monotonic()))
            elapsed = time.monotonic() - start
            heavy.extend(await asyncio.gather(*tasks))
            return elapsed

    async def light(n: int) -> list[float]:
        """The light tenant: a streamed request every 0.25 s (under its 5 a second), TTFT each."""
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            tasks = []
            for i in range(n):
                tasks.append(asyncio.create_task(_ttft(c, i, "k-light")))
                await asyncio.sleep(0.25)
            return list(await asyncio.gather(*tasks))

    # Timed on two shared cores beside other tests: a neighbour's burst of CPU can land on the
    # crowded window alone. The whole measurement runs again (the heavy bucket refilled) once
    # before the bound is held against it; a flood that really costs the light tenant fails both.
    n429 = light_requests = 0
    for attempt in range(2):
        if attempt:
            time.sleep(1.2)
            sent.clear()
            heavy.clear()
        alone = asyncio.run(light(10))
        # The flood from its own thread and event loop, so that the light client's timing is not
        # taken on a loop busy sending the flood.
        with ThreadPoolExecutor(1) as pool:
            flooding = pool.submit(asyncio.run, flood())
            time.sleep(0.1)
            crowded = asyncio.run(light(10))
            elapsed = flooding.result()
        # Right after, on Anthropic's surface, the same tenant by its scheme: refused in its shape.
        msgs = [
            httpx.post(
                url + "/v1/messages",
                json={"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
                headers={"x-api-key": "k-heavy"},
            )
            for _ in range(8)
        ]
        alone += asyncio.run(light(6))  # before and after: the machine's own drift hits both alike
        light_requests += len(alone + crowded)
        ok = [r for r in heavy if r.status_code == 200]
        refused = [r for r in heavy if r.status_code != 200]
        n429 += len(refused) + sum(m.status_code == 429 for m in msgs)
        p50_alone, p50_crowded = statistics.median(alone), statistics.median(crowded)
        print(
            f"light tenant TTFT p50 alone {1000 * p50_alone:.1f} ms, under the flood "
            f"{1000 * p50_crowded:.1f} ms ({p50_crowded / p50_alone:.2f}x)"
        )
        print(f"flood of {len(heavy)} in {elapsed:.2f} s: {len(ok)} answered, {len(refused)} refused")
        # At most a full bucket of 5, then 5 a second for as long as the flood lasted; at least
        # the full bucket. (What one bucket would pass of the requests as they were sent is
        # printed: on a loaded machine they reach the frontend in bursts, and fewer pass.)
        expected = _one_bucket(sent, 5, 5)
        print(f"one bucket would pass {expected} of them as sent")
        assert 5 <= len(ok) <= 5 + 5 * elapsed + 3, (len(ok), expected, elapsed)
        assert all(r.json()["usage"]["completion_tokens"] == 2 for r in ok)
        for r in refused:
            assert r.status_code == 429, r.text
            assert 1 <= int(r.headers["retry-after"]) <= 2
            error = r.json()["error"]
            assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
            assert "heavy" in error["message"]
        assert 429 in [m.status_code for m in msgs]
        denied = next(m for m in msgs if m.status_code == 429)
        assert denied.json()["error"]["type"] == "rate_limit_error" and "retry-after" in denied.headers
        if p50_crowded <= 1.5 * p50_alone:
            break
    # All the light tenant's requests succeeded (each one checked in _ttft) and its TTFT held.
    assert p50_crowded <= 1.5 * p50_alone, (alone, crowded)
    text = httpx.get(url + "/metrics").text
    assert f'dynvllm_tenant_refusals_total{{reason="requests",tenant="heavy"}} {n429}.0' in text
    assert f'dynvllm_tenant_requests_total{{status="200",tenant="light"}} {light_requests}.0' in text
    # Tenant labels come from the file only: the label set stays bounded.
    assert set(re.findall(r'tenant="([^"]*)"', text)) <= {"heavy", "light", "free", "narrow", "-"}
    assert httpx.post(url + "/v1/completions", json=body(0), headers=auth("k-nobody")).status_code == 401


def test_a_tenant_sees_and_uses_only_its_models(service):
    url, _ = service
    listed = httpx.get(url + "/v1/models", headers=auth("k-free")).json()["data"]
    assert [m["id"] for m in listed] == ["tiny"]
    assert httpx.get(url + "/v1/models/tiny", headers=auth("k-free")).status_code == 200
    assert httpx.get(url + "/v1/models", headers=auth("k-narrow")).json() == {"object": "list", "data": []}
    r = httpx.get(url + "/v1/models/tiny", headers=auth("k-narrow"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(url + "/v1/completions", json=body(0), headers=auth("k-narrow"))
    assert r.status_code == 404 and "do not have access" in r.json()["error"]["message"]


def test_under_saturation_high_priority_requests_go_first(service):
    url, _ = service

    def ttft(c: httpx.AsyncClient, i: int, **how):
        return _ttft(c, i, "k-free", max_tokens=10, **how)

    async def run() -> tuple[list[float], list[float]]:
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=200)) as c:
            low = [asyncio.create_task(ttft(c, i, priority=10)) for i in range(24)]
            await asyncio.sleep(0.3)  # all of them queued behind the two slots
            high = [asyncio.create_task(ttft(c, 100 + i, priority=-5)) for i in range(3)]
            high += [
                asyncio.create_task(ttft(c, 200 + i, headers={"x-dynvllm-priority": "-5"})) for i in range(3)
            ]
            return list(await asyncio.gather(*low)), list(await asyncio.gather(*high))

    low, high = asyncio.run(run())
    low_p50, high_p50 = statistics.median(low), statistics.median(high)
    print(f"TTFT p50: high priority {high_p50:.3f} s, low priority {low_p50:.3f} s")
    # 24 requests of ~0.2 s through two slots: the low ones wait up to ~2.4 s; high ones jump ahead
    # (measured 0.55 s against 2.59 s on a loaded 2-core machine).
    assert high_p50 <= low_p50 / 3, (high, low)
    assert max(high) < max(low) / 2
    text = httpx.get(url + "/metrics").text
    assert 'dynvllm_admission_queue_length{model="tiny"} 0.0' in text


def test_requests_wait_in_the_frontend_while_the_worker_reports_saturation(service):
    """The worker runs 2 sequences and may queue none (--admission-max-waiting 0): of 12 requests
    sent at once, the frontend holds what the worker cannot run, by the worker's load reports, and
    lets them go as it frees. The worker's own reports (read from NATS) show its queue empty."""
    import nats

    from dynvllm.runtime.events import LOAD

    url, _ = service
    reports = []
    queued: list[float] = []

    async def run() -> list[float]:
        async def on_report(m):
            reports.append(LOAD.decode(m.data))

        nc = await nats.connect(resolve_nats_url(None, "shared"))
        await nc.subscribe(LOAD.subject("shared"), cb=on_report)
        try:
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                tasks = [asyncio.create_task(_ttft(c, i, "k-free", max_tokens=10)) for i in range(12)]
                while not all(t.done() for t in tasks):
                    text = (await c.get("/metrics")).text
                    queued.append(_metric(text, 'dynvllm_admission_queue_length{model="tiny"}'))
                    await asyncio.sleep(0.05)
                return list(await asyncio.gather(*tasks))
        finally:
            await nc.close()

    start = time.monotonic()
    ttfts = asyncio.run(run())
    took = time.monotonic() - start
    busy = [r for r in reports if r.running > 0]
    print(
        f"12 requests in {took:.2f} s; frontend queue up to {max(queued):.0f}; worker reports while busy: "
        f"running up to {max(r.running for r in busy)}, waiting up to {max(r.waiting for r in busy)} "
        f"({len(busy)} reports); TTFTs {sorted(round(t, 2) for t in ttfts)}"
    )
    # They waited in the frontend, not in the engine's queue (without the gate it would hold 10).
    assert max(queued) >= 6
    assert busy and max(r.running for r in busy) == 2
    assert max(r.waiting for r in busy) <= 1
    # And flowed as the worker freed: in waves of two, ~0.2 s each, none held to the end.
    assert sorted(ttfts)[-1] > 4 * sorted(ttfts)[1]
    assert _metric(httpx.get(url + "/metrics").text, 'dynvllm_admission_queue_length{model="tiny"}') == 0


def test_requests_sent_during_a_worker_restart_succeed(service):
    url, proc = service
    before = httpx.post(url + "/v1/completions", json=body(0), headers=auth("k-free"))
    old_worker = before.headers["x-dynvllm-worker"]
    worker = next(p for p in proc.descendants() if p.cmdline()[2:4] == ["dynvllm.child", "worker"])
    worker.send_signal(signal.SIGKILL)

    async def timed(c: httpx.AsyncClient, i: int) -> tuple[httpx.Response, float]:
        start = time.monotonic()
        r = await c.post("/v1/completions", json=body(i), headers=auth("k-free"))
        return r, time.monotonic() - start

    async def run() -> list[tuple[httpx.Response, float]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            tasks = []
            for i in range(8):  # spread over the restart: before and after the lease expires
                tasks.append(asyncio.create_task(timed(c, i)))
                await asyncio.sleep(0.4)
            return list(await asyncio.gather(*tasks))

    answers = asyncio.run(run())
    assert [r.status_code for r, _ in answers] == [200] * 8, [r.text for r, _ in answers]
    assert all(r.json()["usage"]["completion_tokens"] == 2 for r, _ in answers)
    # Every one answered by the restarted worker, the first ones after waiting for it.
    assert old_worker not in {r.headers["x-dynvllm-worker"] for r, _ in answers}
    waited = [round(t, 2) for _, t in answers]
    print(f"latency of requests sent during the restart: {waited}")
    assert 1.0 < max(waited) < 30
    assert httpx.get(url + "/health").json()["workers"] == 1
    text = httpx.get(url + "/metrics").text
    assert 'dynvllm_worker_restarts_total{model="tiny",role="agg"} 1.0' in text
    # A model never seen is still a 404 at once.
    t = time.monotonic()
    r = httpx.post(url + "/v1/completions", json={**body(0), "model": "nope"}, headers=auth("k-free"))
    assert r.status_code == 404 and time.monotonic() - t < 2


SPREAD = """
tenants:
  heavy:
    keys: [k-heavy]
    requests_per_second: 5
  light:
    keys: [k-light]
    requests_per_second: 5
"""


@pytest.fixture(scope="module")
def spread(tiny_model, tmp_path_factory):
    """Three frontend processes of one service: `serve agg --http-workers 2` (A) and a second
    `dynvllm frontend` (B), both with the same tenants file."""
    folder = tmp_path_factory.mktemp("spread")
    tenants = folder / "tenants.yaml"
    tenants.write_text(SPREAD)
    args = ("--tenants-file", str(tenants))
    url, a = start_agg(
        tiny_model,
        folder / "a.log",
        "spread",
        *args,
        "--http-workers",
        "2",
        "--sim-decode-ms-per-step",
        "1",
        engine_args=SIM,
    )
    procs = [a]
    try:
        wait_http(url + "/health", lambda b: b.get("workers") == 1, a, timeout=120)
        b = start_service(
            ["frontend"],
            folder / "b.log",
            *args,
            namespace="spread",
            nats_url=resolve_nats_url(None, "spread"),
        )
        procs.append(b)
        assert b.url
        wait_http(b.url + "/health", lambda body: body.get("workers") == 1, b, timeout=60)
        yield a, b
    finally:
        stop_all(procs)


def _one_bucket(sent: list[float], rate: float, burst: float) -> int:
    """Requests one token bucket lets through of requests arriving at `sent`."""
    bucket, passed = TokenBucket.full(rate, burst, sent[0]), 0
    for t in sent:
        if bucket.wait(1, t) == 0:
            bucket.take(1, t)
            passed += 1
    return passed


async def _flood(
    urls: list[str], key: str, rate: float, seconds: float, sent: list[float] | None = None
) -> tuple[list[int], float]:
    """`rate` requests a second for `seconds`, in turn to each URL, each on a new connection (so
    the kernel spreads them over --http-workers processes): their statuses, and the time taken."""
    no_reuse = httpx.Limits(max_connections=500, max_keepalive_connections=0)
    sent = [] if sent is None else sent
    async with httpx.AsyncClient(timeout=60, limits=no_reuse) as c:
        tasks = []
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < seconds:
            sent.append(time.monotonic())
            req = c.post(urls[i % len(urls)] + "/v1/completions", json=body(i), headers=auth(key))
            tasks.append(asyncio.create_task(req))
            i += 1
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        elapsed = time.monotonic() - start
        answers = await asyncio.gather(*tasks)
    for r in answers:
        assert r.status_code in (200, 429), r.text
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "rate_limit_exceeded" and int(r.headers["retry-after"]) >= 1
    return [r.status_code for r in answers], elapsed


def _metric(text: str, line: str) -> float:
    m = re.search(re.escape(line) + r" ([0-9.e+-]+)", text)
    return float(m.group(1)) if m else 0.0


def test_limits_hold_across_http_workers_and_frontends_and_after_one_dies(spread):
    a, b = spread
    spec = TenantSpec(keys=["k"], requests_per_second=5)

    async def both() -> tuple[tuple[list[int], float], tuple[list[int], float]]:
        # Ten times its rate.
        heavy = asyncio.create_task(_flood([a.url, b.url], "k-heavy", 50, 3.0, sent))
        light = asyncio.create_task(_flood([a.url, b.url], "k-light", 1, 3.0))
        return await heavy, await light

    sent: list[float] = []
    (heavy, elapsed), (light, _) = asyncio.run(both())
    ok, refused = heavy.count(200), heavy.count(429)
    limit = bound(spec, 3, elapsed)["requests"]
    print(
        f"3 processes, {len(heavy)} requests in {elapsed:.2f} s at 10x: {ok} answered (bound {limit:.0f}), "
        f"{refused} refused; light {light.count(200)}/{len(light)}"
    )
    assert light == [200] * len(light)
    # At least the full bucket (see the flood above); three unshared processes would allow 60.
    print(f"one bucket would pass {_one_bucket(sent, 5, 5)} of them as sent")
    assert 5 <= ok <= limit
    counted = sum(
        _metric(
            httpx.get(u + "/metrics").text, 'dynvllm_tenant_refusals_total{reason="requests",tenant="heavy"}'
        )
        for u in (a.url, b.url)
    )
    assert counted == refused
    shares = [
        _metric(httpx.get(u + "/metrics").text, 'dynvllm_tenant_limit_share{tenant="heavy"}')
        for u in (a.url, b.url)
    ]
    assert sum(shares) == pytest.approx(1.0, abs=0.02), shares

    # Frontend B dies: A's two processes take the whole of the limits once its lease (2 s) is over.
    b.kill_all()
    died = time.monotonic()
    while (
        share := _metric(httpx.get(a.url + "/metrics").text, 'dynvllm_tenant_limit_share{tenant="heavy"}')
    ) < 0.99:
        assert time.monotonic() - died < 4.0, share
        time.sleep(0.05)
    took = time.monotonic() - died
    sent = []
    (heavy, elapsed) = asyncio.run(_flood([a.url], "k-heavy", 50, 3.0, sent))
    ok = heavy.count(200)
    limit = bound(spec, 2, elapsed)["requests"]
    print(
        f"B killed: A held the whole limits after {took:.2f} s; then {ok} of {len(heavy)} answered "
        f"in {elapsed:.2f} s (bound {limit:.0f})"
    )
    # Two processes now share the whole limits (the gauge above): still within the bound for two.
    print(f"one bucket would pass {_one_bucket(sent, 5, 5)} of them as sent")
    assert 5 <= ok <= limit
