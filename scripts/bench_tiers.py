#!/usr/bin/env python
"""Tier-aware routing vs GPU-only knowledge, side by side on the same sim workers.

Sim workers (`dynvllm serve agg --engine sim`) get a small GPU cache and a CPU tier behind it
(`--sim-cpu-blocks`): GPU evictions move there, and a prompt whose prefix continues there loads
those blocks at a tenth of their prefill time. The trace's working set (GROUPS shared prefixes)
exceeds the workers' GPU caches together but fits GPU + CPU. Two frontends join the same
workers in turn: `tier-aware` (the defaults: a CPU-resident block costs 0.1 of a prefill) and
`gpu-only` (`--router-cpu-load-cost 1 --router-disk-load-cost 1`: the router credits only GPU
blocks, as without tier events). Each run uses fresh prefixes (its own seed) and a warm-up pass
over them, and the order alternates per round. Reported per run: TTFT p50/p99 and the cached
share of prompt tokens (as the engines report them, CPU-tier loads included), and the ratios.

    .venv/bin/python scripts/bench_tiers.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import loadgen
from bench_routing import wait_workers, workload
from bench_serve import free_port
from benchkit import serve_agg

VARIANTS = {
    "tier-aware": [],
    "gpu-only": ["--router-cpu-load-cost", "1", "--router-disk-load-cost", "1"],
}


def run_variant(name: str, seed: int, args: argparse.Namespace, nats_url: str, ns: str, log) -> dict:  # type: ignore[no-untyped-def]
    fport = free_port()
    fe = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dynvllm",
            "frontend",
            "--nats-url",
            nats_url,
            "--namespace",
            ns,
            "--router",
            "kv",
            "--no-router-share-load",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(fport),
            *VARIANTS[name],
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{fport}"
        wait_workers(base, args.workers, fe, 120)
        bodies, arrivals = workload(
            seed, args.groups, args.prefix, args.suffix, args.requests, args.rate, 500
        )
        clean = [{k: v for k, v in b.items() if not k.startswith("_")} for b in bodies]
        # Warm-up: every prefix once, so the measured trace starts with all of them cached somewhere
        # (most of them, by then, only in a CPU tier).
        firsts: dict[int, dict] = {}
        for b, c in zip(bodies, clean, strict=True):
            firsts.setdefault(b["_group"], c)
        warm = list(firsts.values())
        asyncio.run(loadgen.run(base, warm, 4, [i / args.rate for i in range(len(warm))]))
        res, elapsed = asyncio.run(loadgen.run(base, clean, 256, arrivals))
        s = loadgen.summary(res, elapsed)
        prompt_tokens = sum(len(b["prompt"]) for b in bodies)
        cached = sum(r.cached for r in res if r.ok)
        return {
            "variant": name,
            "ok": s["ok"],
            "cached_share": cached / prompt_tokens,
            "ttft_p50_ms": s["ttft_p50_ms"],
            "ttft_p99_ms": s["ttft_p99_ms"],
        }
    finally:
        fe.send_signal(signal.SIGTERM)
        fe.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--gpu-blocks", type=int, default=128, help="GPU cache per worker, 32-token blocks")
    ap.add_argument("--cpu-blocks", type=int, default=1024, help="CPU tier per worker, 32-token blocks")
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--suffix", type=int, default=64)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rate", type=float, default=10.0, help="Poisson arrivals per second")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from dynvllm.models.tiny import build_tiny_model

    model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    ns = f"tiers{os.getpid()}"
    port = free_port()
    log = open("/tmp/bench_tiers_serve.log", "wb")
    serve = subprocess.Popen(
        [
            *serve_agg(model),
            "--workers",
            str(args.workers),
            "--engine",
            "sim",
            "--namespace",
            ns,
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(port),
            "--block-size",
            "32",
            "--sim-kv-blocks",
            str(args.gpu_blocks),
            "--sim-cpu-blocks",
            str(args.cpu_blocks),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    rows: list[dict] = []
    try:
        wait_workers(f"http://127.0.0.1:{port}", args.workers, serve)
        from dynvllm.runtime import state

        nats_url = state.resolve_nats_url(None, ns)
        seed = 2000
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                seed += 1
                row = {"round": r + 1, **run_variant(name, seed, args, nats_url, ns, log)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
    working = args.groups * (args.prefix // 32)
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cpus, sim x {args.workers}: GPU "
        f"{args.gpu_blocks} + CPU {args.cpu_blocks} blocks each; working set {working} blocks "
        f"({working / (args.workers * args.gpu_blocks):.1f}x the GPU tiers); {args.groups} groups x "
        f"{args.prefix}+{args.suffix} tokens, {args.requests} requests at {args.rate}/s"
    )
    print("round  variant      ok  cached share  TTFT p50 ms  TTFT p99 ms")
    for row in rows:
        print(
            f"{row['round']:5d}  {row['variant']:11s} {row['ok']:4d}  {row['cached_share']:11.1%}  "
            f"{row['ttft_p50_ms']:11.1f}  {row['ttft_p99_ms']:11.1f}"
        )
    for r in range(1, args.rounds + 1):
        a = next(x for x in rows if x["round"] == r and x["variant"] == "tier-aware")
        b = next(x for x in rows if x["round"] == r and x["variant"] == "gpu-only")
        print(
            f"round {r}: TTFT p50 gpu-only / tier-aware {b['ttft_p50_ms'] / a['ttft_p50_ms']:.2f}x; "
            f"cached share {a['cached_share']:.1%} vs {b['cached_share']:.1%}"
        )


if __name__ == "__main__":
    main()
