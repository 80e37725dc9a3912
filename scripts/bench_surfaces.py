#!/usr/bin/env python
"""What a request costs the frontend through each API surface: OpenAI chat completions, the
Responses API and Anthropic Messages, the same conversation (one user message, the same output
length), side by side in one run.

One `dynvllm serve agg --engine sim` with no prefill or decode time (the frontend is the
bottleneck); per round and surface, a closed loop at concurrency C of N requests; the surfaces
take turns (their order rotates each round). Printed: req/s and the frontend process's CPU ms per
request (user + system, psutil), medians over rounds, each surface's ratio of medians to chat,
and the median of its per-round CPU ratios to chat's round ("paired": load from other processes
drifts between rounds, less within one); then the kernel's (system) part of the frontend's CPU
and this client's own CPU per request (it shares the machine: bigger answers cost it more).
Run: .venv/bin/python scripts/bench_surfaces.py [--stream] [--unstored] [--api-surfaces LIST]
[--requests 1500] [--concurrency 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import psutil
from bench_replicas import cpu_seconds, start, wait_workers
from bench_serve import free_port
from benchkit import stop_all

TEXT = (
    "the quick red fox runs where the old mountain road meets the river and the city, "
    "then the small cat sees a dog near the house and the tree; what happens next?"
)
OUT = 16


def bodies(stream: bool, unstored: bool = False) -> dict[str, tuple[str, dict]]:
    """Each surface's path and body for the same conversation and output length (`unstored`: a
    Responses request with `store: false` as well, to tell the store's part)."""
    msgs = [{"role": "user", "content": TEXT}]
    more = {}
    if unstored:
        body = {"model": "m", "input": TEXT, "max_output_tokens": OUT, "stream": stream, "store": False}
        more["resp-nostore"] = ("/v1/responses", body)
    return {
        "chat": (
            "/v1/chat/completions",
            {"model": "m", "messages": msgs, "max_tokens": OUT, "stream": stream},
        ),
        "responses": (
            "/v1/responses",
            {"model": "m", "input": TEXT, "max_output_tokens": OUT, "stream": stream},
        ),
        "messages": ("/v1/messages", {"model": "m", "messages": msgs, "max_tokens": OUT, "stream": stream}),
        **more,
    }


async def loop(
    session, url: str, path: str, body: dict, n: int, c: int, frontend
) -> tuple[float, float, int, float, float]:
    """req/s, frontend CPU ms per request, the failures of one closed loop, the kernel's (system)
    part of that CPU time, and this client's CPU ms per request (it shares the machine)."""
    left, ok, failed = n, 0, 0

    async def client() -> None:
        nonlocal left, ok, failed
        while left > 0:
            left -= 1
            async with session.post(url + path, json=body) as r:
                await r.read()
                if r.status == 200:
                    ok += 1
                else:
                    failed += 1

    me = psutil.Process()
    cpu0, sys0, mine0 = cpu_seconds([frontend]), frontend.cpu_times().system, cpu_seconds([me])
    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(c)))
    wall = time.perf_counter() - t0
    per = 1000 / max(1, ok)
    sys_ms = (frontend.cpu_times().system - sys0) * per
    return (
        ok / wall,
        (cpu_seconds([frontend]) - cpu0) * per,
        failed,
        sys_ms,
        (cpu_seconds([me]) - mine0) * per,
    )


async def main(args) -> None:
    import aiohttp

    from dynvllm.models.tiny import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="bench_surfaces_"))
    model = build_tiny_model(tmp / "model")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sim = ["--engine", "sim", "--sim-prefill-us-per-token", "0", "--sim-decode-ms-per-step", "0"]
    cmd = ["serve", "agg", "--model", str(model), "--served-model-name", "m", "--workers", "1", *sim]
    if args.api_surfaces:  # their order is the routes' order: a path matched later costs more
        cmd += ["--api-surfaces", args.api_surfaces]
    cmd += ["--namespace", f"surfaces{os.getpid()}", "--http-host", "127.0.0.1", "--http-port", str(port)]
    log = open(tmp / "serve.log", "wb")
    proc = start(cmd, log)
    results: dict[str, list[tuple[float, float, float, float]]] = {}
    try:
        connector = aiohttp.TCPConnector(limit=args.concurrency * 2)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=120)
        ) as session:
            await wait_workers(session, url, 1, proc)
            frontend = next(
                p for p in psutil.Process(proc.pid).children(recursive=True) if "frontend" in p.cmdline()
            )
            surfaces = bodies(args.stream, args.unstored)
            for name, (path, body) in surfaces.items():  # warm-up, and the same output length everywhere
                async with session.post(url + path, json={**body, "stream": False}) as r:
                    assert r.status == 200, (name, await r.text())
                await loop(session, url, path, body, args.concurrency * 4, args.concurrency, frontend)
            names = list(surfaces)
            for k in range(args.rounds):
                order = names[k % len(names) :] + names[: k % len(names)]
                for name in order:
                    path, body = surfaces[name]
                    rps, cpu, failed, sys_ms, client = await loop(
                        session, url, path, body, args.requests, args.concurrency, frontend
                    )
                    assert not failed, f"{name}: {failed} requests failed"
                    results.setdefault(name, []).append((rps, cpu, sys_ms, client))
                    print(
                        f"round {k + 1} {name:10s} {rps:8.1f} req/s  {cpu:6.3f} CPU ms/req "
                        f"(system {sys_ms:.3f}; client {client:.3f})",
                        flush=True,
                    )
    finally:
        stop_all([proc])
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\nc={args.concurrency}, {args.requests} requests x {args.rounds} rounds, "
        f"output {OUT} tokens, stream={args.stream}"
    )
    print(
        f"{'surface':10s} {'req/s':>9s} {'(spread)':>15s} {'CPU ms/req':>11s} {'(spread)':>15s} "
        f"{'rps ratio':>9s} {'CPU ratio':>9s} {'paired':>7s} {'system ms':>9s} {'client ms':>9s}"
    )
    base = {k: statistics.median(x[k] for x in results["chat"]) for k in (0, 1)}
    for name, rows in results.items():
        rps = [r[0] for r in rows]
        cpu = [r[1] for r in rows]
        mr, mc = statistics.median(rps), statistics.median(cpu)
        ms, mcl = statistics.median(r[2] for r in rows), statistics.median(r[3] for r in rows)
        paired = statistics.median(r[1] / c[1] for r, c in zip(rows, results["chat"], strict=True))
        print(
            f"{name:10s} {mr:9.1f} {f'{min(rps):.0f}-{max(rps):.0f}':>15s} {mc:11.3f} "
            f"{f'{min(cpu):.3f}-{max(cpu):.3f}':>15s} {mr / base[0]:9.2f} {mc / base[1]:9.2f} {paired:7.2f} "
            f"{ms:9.3f} {mcl:9.3f}"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stream", action="store_true", help="streamed answers (SSE) instead of whole bodies")
    ap.add_argument("--unstored", action="store_true", help="a Responses row with store: false as well")
    ap.add_argument("--api-surfaces", help="the frontend's --api-surfaces (default: every installed one)")
    asyncio.run(main(ap.parse_args()))
