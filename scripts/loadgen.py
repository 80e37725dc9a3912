"""A light asyncio + aiohttp load client for OpenAI streaming completions (one core, faithful on 2).

Used by the serving benchmarks: fixed prompts, fixed concurrency, per-request TTFT and
inter-token latency from SSE chunk arrival times.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class Result:
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    tokens: int = 0
    ok: bool = False
    headers: dict = field(default_factory=dict)
    cached: int = 0


async def one(session, url: str, body: dict) -> Result:
    try:
        return await _one(session, url, body)
    except Exception:  # a failed request counts as not ok; the run goes on
        return Result()


async def _one(session, url: str, body: dict) -> Result:
    res = Result()
    t0 = time.perf_counter()
    last = None
    async with session.post(url, json=body) as r:
        res.headers = dict(r.headers)
        if r.status != 200:
            return res
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                res.tokens = chunk["usage"]["completion_tokens"]
                res.cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            if not chunk.get("choices"):
                continue
            now = time.perf_counter()
            if last is None:
                res.ttft = now - t0
            else:
                res.itls.append(now - last)
            last = now
    res.ok = True
    return res


async def run(
    base: str, bodies: list[dict], concurrency: int, arrivals: list[float] | None = None
) -> tuple[list[Result], float]:
    """Send every body; `arrivals` (seconds from start) schedules them, else a closed loop."""
    import aiohttp

    url = base + "/v1/completions"
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()

        async def task(i: int, body: dict) -> Result:
            if arrivals is not None:
                await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
            async with sem:
                return await one(session, url, body)

        results = await asyncio.gather(*(task(i, b) for i, b in enumerate(bodies)))
        return list(results), time.perf_counter() - start


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summary(results: list[Result], elapsed: float) -> dict:
    ok = [r for r in results if r.ok]
    itls = [x for r in ok for x in r.itls]
    return {
        "ok": len(ok),
        "n": len(results),
        "tok_s": sum(r.tokens for r in ok) / elapsed,
        "ttft_p50_ms": pct([r.ttft for r in ok], 0.5) * 1000,
        "ttft_p99_ms": pct([r.ttft for r in ok], 0.99) * 1000,
        "itl_p50_ms": pct(itls, 0.5) * 1000,
        "itl_mean_ms": (statistics.mean(itls) * 1000) if itls else float("nan"),
    }
