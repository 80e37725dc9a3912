"""`dynvllm profile`: a concurrency sweep on one worker of a role, per (ISL, OSL) point, into the
profile the planner reads (`dynvllm.planner.profile`).

Each level keeps `concurrency` streams busy with fresh random prompts of ISL tokens (so no
prefix is cached) asking for exactly OSL tokens (ignore_eos), and measures, at the client, the
request rate, TTFT (to the first content event) and ITL (gaps between content events).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Sequence

import httpx

from dynvllm.planner.profile import Level, Point, Profile


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def summarize(concurrency: int, seconds: float, ttfts: list[float], gaps: list[float]) -> Level:
    return Level(
        concurrency=concurrency,
        request_rate=len(ttfts) / seconds if seconds > 0 else 0.0,
        ttft_p50=percentile(ttfts, 0.5),
        ttft_p90=percentile(ttfts, 0.9),
        itl_p50=percentile(gaps, 0.5),
        itl_p90=percentile(gaps, 0.9),
    )


async def _one(
    http: httpx.AsyncClient, url: str, model: str, prompt: list[int], osl: int
) -> tuple[float, list[float]]:
    body = {"model": model, "prompt": prompt, "max_tokens": osl, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"the service answered {r.status_code}: {(await r.aread())[:300]!r}")
        # Events split on blank lines by hand: aiter_lines would also split inside a JSON string
        # at characters str.splitlines() treats as line ends (U+2028, ...).
        buffer = ""
        async for chunk in r.aiter_text():
            buffer += chunk
            *events, buffer = buffer.split("\n\n")
            for event in events:
                if event.startswith("data: ") and event != "data: [DONE]":
                    choices = json.loads(event[6:]).get("choices") or []
                    if choices and choices[0].get("text"):
                        stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("a stream ended without any text")
    return stamps[0] - t0, [b - a for a, b in itertools.pairwise(stamps)]


async def sweep_point(
    url: str, model: str, isl: int, osl: int, levels: Sequence[int], requests: int, vocab: int, seed: int = 0
) -> Point:
    rng = random.Random(seed)
    point = Point(isl, osl)
    limits = httpx.Limits(max_connections=max(levels) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        for c in levels:
            point.sweep.append(await _level(http, url, model, isl, osl, c, max(requests, c), vocab, rng))
    return point


async def _level(
    http: httpx.AsyncClient,
    url: str,
    model: str,
    isl: int,
    osl: int,
    concurrency: int,
    requests: int,
    vocab: int,
    rng: random.Random,
) -> Level:
    ttfts: list[float] = []
    gaps: list[float] = []
    left = requests

    async def stream_loop() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            prompt = [rng.randrange(3, vocab) for _ in range(isl)]
            ttft, g = await _one(http, url, model, prompt, osl)
            ttfts.append(ttft)
            gaps.extend(g)

    t0 = time.perf_counter()
    await asyncio.gather(*(stream_loop() for _ in range(concurrency)))
    return summarize(concurrency, time.perf_counter() - t0, ttfts, gaps)


async def profile_role(
    url: str,
    model: str,
    role: str,
    isls: Sequence[int],
    osls: Sequence[int],
    levels: Sequence[int],
    requests: int,
    vocab: int,
    engine: str = "",
) -> Profile:
    # One request first: an engine's first batches pay one-time costs (a CPU vLLM's first level
    # measured 611 ms TTFT p90 at its first level, 18-29 ms at the first level of later points).
    async with httpx.AsyncClient(timeout=600) as http:
        await _one(http, url, model, [3] * max(1, min(isls)), 2)
    points = [
        await sweep_point(url, model, isl, osl, levels, requests, vocab, seed=k)
        for k, (isl, osl) in enumerate((i, o) for i in isls for o in osls)
    ]
    return Profile({role: points}, model=model, engine=engine)
