#!/usr/bin/env python
"""Disaggregated vs aggregated serving on the same cores, and KV transfer vs recompute.

1. Mixed load: decode-heavy streams (short prompt, 128 tokens out) run while long prompts
   (--long tokens) arrive; measured on `serve agg --workers 2` and on `serve disagg --prefill 1
   --decode 1` (two engines each). Reports TTFT and inter-token latency p50/p99 of both kinds.
2. Transfer vs recompute: on the disagg workers, unique prompts of 1,000 tokens through a
   frontend that always uses the prefill hop (NIXL transfer) and one that never does (the
   decode engine recomputes), alternating; reports TTFT medians and the difference.
Run: .venv/bin/python scripts/bench_disagg.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import loadgen
from bench_routing import wait_workers
from bench_serve import free_port, stop

ENGINE = ["--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20), "--block-size", "32"]


def body(prompt: list[int], max_tokens: int) -> dict:
    return {
        "model": "m",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def mixed(base: str, long_len: int, seed: int) -> dict:
    rng = random.Random(seed)
    decodes = [body([rng.randrange(3, 500) for _ in range(32)], 128) for _ in range(8)]
    longs = [body([rng.randrange(3, 500) for _ in range(long_len)], 8) for _ in range(12)]
    arrivals = [0.0] * len(decodes) + [0.5 + 0.4 * i for i in range(len(longs))]
    res, _ = await loadgen.run(base, decodes + longs, 64, arrivals)
    d, lg = res[: len(decodes)], res[len(decodes) :]
    itl = [x for r in d for x in r.itls]
    return {
        "decode_itl_p50_ms": loadgen.pct(itl, 0.5) * 1000,
        "decode_itl_p99_ms": loadgen.pct(itl, 0.99) * 1000,
        "long_ttft_p50_ms": loadgen.pct([r.ttft for r in lg], 0.5) * 1000,
        "long_ttft_p99_ms": loadgen.pct([r.ttft for r in lg], 0.99) * 1000,
        "ok": sum(r.ok for r in res),
    }


def start(args: list[str], ns: str, port: int, log) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dynvllm",
            *args,
            "--namespace",
            ns,
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--long", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.model:
        model = args.model
    else:
        from dynvllm.models.tiny import build_tiny_model

        model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    log = open("/tmp/bench_disagg.log", "wb")
    results: dict[str, list[dict]] = {"agg": [], "disagg": []}
    for rnd in range(args.rounds):
        for mode in ("agg", "disagg"):
            ns, port = f"bd{os.getpid()}{mode}{rnd}", free_port()
            cmd = (
                ["serve", "agg", "--workers", "2"]
                if mode == "agg"
                else [
                    "serve",
                    "disagg",
                    "--prefill",
                    "1",
                    "--decode",
                    "1",
                    "--disagg-min-prompt-tokens",
                    "256",
                ]
            )
            p = start([*cmd, "--model", model, "--served-model-name", "m", *ENGINE], ns, port, log)
            try:
                base = f"http://127.0.0.1:{port}"
                wait_workers(base, 2, p)
                r = asyncio.run(mixed(base, args.long, rnd))
                results[mode].append(r)
                print(f"round {rnd} {mode:6s} " + " ".join(f"{k}={v:.1f}" for k, v in r.items()), flush=True)
                if mode == "disagg" and rnd == 0:
                    transfer_vs_recompute(model, ns, log)
            finally:
                stop(p)
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cpus, tiny model, "
        f"medians of {args.rounds} rounds"
    )
    keys = list(results["agg"][0])
    for mode in ("agg", "disagg"):
        print(
            f"{mode:7s} "
            + "  ".join(f"{k}={statistics.median(r[k] for r in results[mode]):.1f}" for k in keys)
        )


def transfer_vs_recompute(model: str, ns: str, log) -> None:
    from dynvllm.runtime import state

    url = state.resolve_nats_url(None, ns)
    ports = {"transfer": free_port(), "recompute": free_port()}
    fes = {
        k: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dynvllm",
                "frontend",
                "--nats-url",
                url,
                "--namespace",
                ns,
                "--disagg-min-prompt-tokens",
                "0" if k == "transfer" else "1000000",
                "--http-host",
                "127.0.0.1",
                "--http-port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for k, port in ports.items()
    }
    try:
        for k, port in ports.items():
            wait_workers(f"http://127.0.0.1:{port}", 2, fes[k], 60)
        rng = random.Random(7)
        ttft: dict[str, list[float]] = {"transfer": [], "recompute": []}
        for _ in range(10):
            for k, port in ports.items():
                prompt = [rng.randrange(3, 500) for _ in range(1000)]
                res, _ = asyncio.run(loadgen.run(f"http://127.0.0.1:{port}", [body(prompt, 2)], 1))
                ttft[k].append(res[0].ttft * 1000)
        t, r = statistics.median(ttft["transfer"]), statistics.median(ttft["recompute"])
        print(
            f"1,000-token prompt TTFT: prefill hop + NIXL transfer {t:.1f} ms, decode recomputes {r:.1f} ms, "
            f"difference {t - r:+.1f} ms",
            flush=True,
        )
    finally:
        for p in fes.values():
            p.send_signal(signal.SIGTERM)
            p.wait(30)


if __name__ == "__main__":
    main()
