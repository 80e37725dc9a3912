#!/usr/bin/env python
"""What storing a Responses answer costs with the shared store (NATS JetStream) against the
in-process store alone, side by side in one run.

One `dynvllm serve agg --engine sim` (no prefill or decode time: the frontends are the
bottleneck) whose frontend A shares stored responses, a second sharing frontend B and a third
frontend L with `--no-responses-share` (today's in-process store), all on the same NATS and
worker. Per round, closed loops at concurrency C of N requests, in turns (the order rotates each
round): Responses with `store: true` and `store: false` on A and on L; then GET of stored
responses made on A, through A (a hit in its memory) and through B (a miss there, read from
the bucket). Printed per round and as medians: req/s, CPU ms per request of the frontend that
served it and of the nats-server, and the ratios stored/unstored and shared/local.
Run: .venv/bin/python scripts/bench_responses_store.py [--stream] [--requests 1000]
[--concurrency 32] [--rounds 6]
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
from collections.abc import Callable
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


async def loop(session, requests: list[tuple[str, str, dict | None]], c: int, procs: list) -> tuple:
    """req/s, CPU ms per request of each of `procs`, failures: `requests` (method, URL, body)
    sent by C clients."""
    left, ok, failed = list(reversed(requests)), 0, 0

    async def client() -> None:
        nonlocal ok, failed
        while left:
            method, url, body = left.pop()
            async with session.request(method, url, json=body) as r:
                await r.read()
                if r.status == 200:
                    ok += 1
                else:
                    failed += 1

    cpu0 = [cpu_seconds([p]) for p in procs]
    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(c)))
    wall = time.perf_counter() - t0
    per = 1000 / max(1, ok)
    return ok / wall, [(cpu_seconds([p]) - c0) * per for p, c0 in zip(procs, cpu0, strict=True)], failed


async def main(args) -> None:
    import aiohttp

    from dynvllm.models.tiny import build_tiny_model
    from dynvllm.runtime import state

    tmp = Path(tempfile.mkdtemp(prefix="bench_responses_store_"))
    model = build_tiny_model(tmp / "model")
    ns = f"respstore{os.getpid()}"
    ports = [free_port() for _ in range(3)]
    a_url, b_url, l_url = (f"http://127.0.0.1:{p}" for p in ports)
    sim = ["--engine", "sim", "--sim-prefill-us-per-token", "0", "--sim-decode-ms-per-step", "0"]
    where = ["--namespace", ns, "--http-host", "127.0.0.1"]
    serve = ["serve", "agg", "--model", str(model), "--served-model-name", "m", "--workers", "1", *sim]
    logs = [open(tmp / f"{name}.log", "wb") for name in ("serve", "b", "l")]
    procs = [start([*serve, *where, "--http-port", str(ports[0])], logs[0])]
    rows: dict[str, list[tuple[float, float, float]]] = {}
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=args.concurrency * 2),
            timeout=aiohttp.ClientTimeout(total=120),
        ) as session:
            await wait_workers(session, a_url, 1, procs[0])
            nats = ["--nats-url", state.resolve_nats_url(None, ns)]
            procs.append(start(["frontend", *where, *nats, "--http-port", str(ports[1])], logs[1]))
            local = ["--http-port", str(ports[2]), "--no-responses-share"]
            procs.append(start(["frontend", *where, *nats, *local], logs[2]))
            for url, proc in ((b_url, procs[1]), (l_url, procs[2])):
                await wait_workers(session, url, 1, proc)
            children = psutil.Process(procs[0].pid).children(recursive=True)
            fa = next(p for p in children if "frontend" in p.cmdline())
            nats_proc = next(p for p in children if "nats-server" in p.name())
            fb, fl = psutil.Process(procs[1].pid), psutil.Process(procs[2].pid)

            def create(url: str, store: bool) -> tuple[str, str, dict]:
                body = {"model": "m", "input": TEXT, "max_output_tokens": OUT, "stream": args.stream}
                return ("POST", url + "/v1/responses", {**body, "store": store})

            async def made_on_a() -> list[str]:
                """200 new stored responses of A (the stored cases push older ones out)."""
                ids = []
                for _ in range(200):
                    _, url, body = create(a_url, True)
                    async with session.post(url, json={**body, "stream": False}) as r:
                        text = await r.read()
                        assert r.status == 200, text
                        ids.append(text.split(b'"id":"', 1)[1].split(b'"', 1)[0].decode())
                return ids

            def gets(url: str) -> Callable[[list[str]], list]:
                return lambda ids: [("GET", f"{url}/v1/responses/{ids[k % 200]}", None) for k in range(n)]

            n = args.requests
            cases = {
                "A stored": (lambda _: [create(a_url, True)] * n, fa),
                "A unstored": (lambda _: [create(a_url, False)] * n, fa),
                "L stored": (lambda _: [create(l_url, True)] * n, fl),
                "L unstored": (lambda _: [create(l_url, False)] * n, fl),
                "GET on A": (gets(a_url), fa),
                "GET on B": (gets(b_url), fb),
            }
            for name, (make, _) in cases.items():  # warm-up
                ids = await made_on_a() if name.startswith("GET") else []
                await loop(session, make(ids)[: args.concurrency * 4], args.concurrency, [fa])
            names = list(cases)
            print(f"uptime: {os.getloadavg()}", flush=True)
            for k in range(args.rounds):
                for name in names[k % len(names) :] + names[: k % len(names)]:
                    make, proc = cases[name]
                    reqs = make(await made_on_a() if name.startswith("GET") else [])
                    rps, (cpu, ncpu), failed = await loop(session, reqs, args.concurrency, [proc, nats_proc])
                    assert not failed, f"{name}: {failed} requests failed"
                    rows.setdefault(name, []).append((rps, cpu, ncpu))
                    print(
                        f"round {k + 1} {name:11s} {rps:8.1f} req/s  frontend {cpu:6.3f} CPU ms/req  "
                        f"nats-server {ncpu:6.3f}",
                        flush=True,
                    )
            print(f"uptime: {os.getloadavg()}", flush=True)
    except BaseException:
        for log in logs:
            log.flush()
            print(f"--- {log.name}:", Path(log.name).read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        stop_all(procs[::-1])
        for log in logs:
            log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nc={args.concurrency}, {args.requests} requests x {args.rounds} rounds, stream={args.stream}")
    print(f"{'case':11s} {'req/s':>8s} {'frontend ms':>11s} {'(spread)':>13s} {'nats ms':>8s}")
    med = {}
    for name, rs in rows.items():
        med[name] = [statistics.median(r[i] for r in rs) for i in range(3)]
        cpu = [r[1] for r in rs]
        print(
            f"{name:11s} {med[name][0]:8.1f} {med[name][1]:11.3f} {f'{min(cpu):.3f}-{max(cpu):.3f}':>13s} "
            f"{med[name][2]:8.3f}"
        )

    def paired(x: str, y: str) -> float:
        return statistics.median(p[1] / q[1] for p, q in zip(rows[x], rows[y], strict=True))

    print("\nfrontend CPU ratios (of medians; paired by round):")
    for x, y in (
        ("A stored", "A unstored"),
        ("L stored", "L unstored"),
        ("A stored", "L stored"),
        ("A unstored", "L unstored"),
        ("GET on B", "GET on A"),
    ):
        print(f"  {x} / {y}: {med[x][1] / med[y][1]:.3f}; {paired(x, y):.3f}")
    extra = (med["A stored"][1] - med["A unstored"][1]) - (med["L stored"][1] - med["L unstored"][1])
    print(f"sharing's own cost per stored response: {extra * 1000:.0f} us frontend CPU (medians)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--stream", action="store_true", help="streamed answers (SSE) instead of whole bodies")
    asyncio.run(main(ap.parse_args()))
