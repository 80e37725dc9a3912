#!/usr/bin/env python
"""Routing quality: a shared-prefix workload against the same workers under every policy.

Workers start once (`dynvllm serve agg --workers W`); for each policy a separate
`dynvllm frontend --router POLICY` joins them and the workload runs with fresh prefixes (a new
seed per policy, so no policy inherits another's cache). Reports prefix-cache hit rate (cached
prompt tokens / prompt tokens, as the engines report them), its share of the oracle maximum, and
TTFT p50/p99. Run:
  .venv/bin/python scripts/bench_routing.py --engine vllm --workers 4
  .venv/bin/python scripts/bench_routing.py --engine sim --workers 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import loadgen
from bench_serve import free_port
from benchkit import serve_agg

POLICIES = ["kv", "kv-approx", "least-loaded", "round-robin", "random"]


def workload(seed: int, groups: int, prefix: int, suffix: int, n: int, rate: float, vocab: int):
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, vocab) for _ in range(prefix)] for _ in range(groups)]
    bodies, arrivals, t = [], [], 0.0
    for _ in range(n):
        g = rng.randrange(groups)
        prompt = prefixes[g] + [rng.randrange(3, vocab) for _ in range(suffix)]
        bodies.append(
            {
                "model": "m",
                "prompt": prompt,
                "max_tokens": 8,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
                "_group": g,
            }
        )
        t += rng.expovariate(rate)
        arrivals.append(t)
    return bodies, arrivals


def oracle_cached(bodies: list[dict], prefix: int, block: int) -> int:
    seen: set[int] = set()
    total = 0
    for b in bodies:
        if b["_group"] in seen:
            total += (prefix // block) * block
        seen.add(b["_group"])
    return total


def wait_workers(url: str, want: int, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.load(r).get("workers", 0) >= want:
                    return
        except Exception:
            pass
        time.sleep(1)
    raise RuntimeError("workers did not come up")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="vllm", choices=["vllm", "sim"])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--suffix", type=int, default=128)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals per second")
    ap.add_argument("--model")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument(
        "--kv-blocks",
        type=int,
        default=512,
        help="KV capacity per worker in 32-token blocks: below the working set, routing decides hits",
    )
    args = ap.parse_args()
    model = args.model
    if not model:
        from dynvllm.models.tiny import build_tiny_model

        model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    vocab = 500
    ns = f"bench{os.getpid()}"
    port = free_port()
    # Tiny model: 2 layers x (K+V) x 1 KV head x 64 dims x 2 bytes = 512 bytes per token.
    engine_args = (
        [
            "--enforce-eager",
            "--kv-cache-memory-bytes",
            str(args.kv_blocks * 32 * 512),
            "--block-size",
            "32",
            "--max-model-len",
            "2048",
        ]
        if args.engine == "vllm"
        else ["--block-size", "32", "--sim-kv-blocks", str(args.kv_blocks)]
    )
    log = open("/tmp/bench_routing_serve.log", "wb")
    serve = subprocess.Popen(
        [
            *serve_agg(model),
            "--workers",
            str(args.workers),
            "--engine",
            args.engine,
            "--namespace",
            ns,
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(port),
            *engine_args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    rows = []
    try:
        wait_workers(f"http://127.0.0.1:{port}", args.workers, serve)
        from dynvllm.runtime import state

        nats_url = state.resolve_nats_url(None, ns)
        for i, policy in enumerate(args.policies.split(",")):
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
                    policy,
                    "--http-host",
                    "127.0.0.1",
                    "--http-port",
                    str(fport),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                base = f"http://127.0.0.1:{fport}"
                wait_workers(base, args.workers, fe, 120)
                bodies, arrivals = workload(
                    1000 + i, args.groups, args.prefix, args.suffix, args.requests, args.rate, vocab
                )
                clean = [{k: v for k, v in b.items() if not k.startswith("_")} for b in bodies]
                res, elapsed = asyncio.run(loadgen.run(base, clean, 256, arrivals))
                s = loadgen.summary(res, elapsed)
                prompt_tokens = sum(len(b["prompt"]) for b in bodies)
                cached = sum(r.cached for r in res if r.ok)
                oracle = oracle_cached(bodies, args.prefix, 32)
                row = {
                    "policy": policy,
                    "ok": s["ok"],
                    "hit_rate": cached / prompt_tokens,
                    "of_oracle": cached / oracle if oracle else float("nan"),
                    "ttft_p50_ms": s["ttft_p50_ms"],
                    "ttft_p99_ms": s["ttft_p99_ms"],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            finally:
                fe.send_signal(signal.SIGTERM)
                fe.wait(30)
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cpus, engine {args.engine} x {args.workers}, "
        f"{args.kv_blocks} KV blocks each, "
        f"{args.groups} groups x {args.prefix}+{args.suffix} tokens, "
        f"{args.requests} requests at {args.rate}/s (Poisson)"
    )
    rr = next((r for r in rows if r["policy"] == "round-robin"), None)
    print("policy        ok   hit rate  of oracle  TTFT p50 ms  TTFT p99 ms  p50 vs round-robin")
    for r in rows:
        speed = rr["ttft_p50_ms"] / r["ttft_p50_ms"] if rr else float("nan")
        print(
            f"{r['policy']:12s} {r['ok']:4d}   {r['hit_rate']:7.1%}   {r['of_oracle']:7.1%}   "
            f"{r['ttft_p50_ms']:10.1f}   "
            f"{r['ttft_p99_ms']:10.1f}   {speed:6.2f}x"
        )


if __name__ == "__main__":
    main()
