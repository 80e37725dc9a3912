#!/usr/bin/env python
"""dynvllm serve agg vs vLLM's own OpenAI server: same tiny model, same engine args, same load.

Each system is started, loaded at concurrency 1, 8 and 32, and stopped, alternately, `--rounds`
times in one run (the CPU engine busy-waits, so the two never run at once). Prints medians per
system and the ratios. Run: .venv/bin/python scripts/bench_serve.py [--model PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import loadgen
from benchkit import free_port, serve_agg, stop, wait_ready

ENGINE = [
    "--enforce-eager",
    "--kv-cache-memory-bytes",
    str(256 << 20),
    "--block-size",
    "32",
    "--max-num-seqs",
    "64",
]
WORDS = [
    "the",
    "a",
    "red",
    "blue",
    "cat",
    "dog",
    "tree",
    "river",
    "city",
    "road",
    "runs",
    "sees",
    "makes",
    "old",
    "new",
    "happy",
    "model",
    "cache",
]


def start(system: str, model: str, port: int, log) -> subprocess.Popen:
    if system == "dynvllm":
        cmd = [
            *serve_agg(model),
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(port),
            "--router",
            "round-robin",
            *ENGINE,
        ]
    else:
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--served-model-name",
            "m",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *ENGINE,
        ]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def bodies(n: int, max_tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "model": "m",
            "prompt": " ".join(rng.choice(WORDS) for _ in range(100)),
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for _ in range(n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    model = args.model
    if not model:
        from dynvllm.models.tiny import build_tiny_model

        model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    levels = [1, 8, 32]
    table: dict[tuple[str, int], list[dict]] = {}
    for rnd in range(args.rounds):
        for system in ("dynvllm", "vllm"):
            port = free_port()
            with open(f"/tmp/bench_serve_{system}.log", "wb") as log:
                proc = start(system, model, port, log)
                try:
                    wait_ready(port, proc, path="/v1/models", ready=lambda body: b'"m"' in body)
                    base = f"http://127.0.0.1:{port}"
                    asyncio.run(loadgen.run(base, bodies(8, 8, 99), 8))  # warm-up
                    for c in levels:
                        res, elapsed = asyncio.run(
                            loadgen.run(base, bodies(max(16, 2 * c), args.max_tokens, c), c)
                        )
                        s = loadgen.summary(res, elapsed)
                        table.setdefault((system, c), []).append(s)
                        print(
                            f"round {rnd} {system:8s} c={c:2d} "
                            + " ".join(f"{k}={v:.1f}" for k, v in s.items()),
                            flush=True,
                        )
                finally:
                    stop(proc)
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cpus, tiny model, "
        f"max_tokens {args.max_tokens}, medians of {args.rounds} rounds"
    )
    print("c   dynvllm tok/s   vllm tok/s   ratio   TTFT p50 d/v ms   TTFT p99 d/v ms   ITL p50 d/v ms")
    for c in levels:
        d = {k: statistics.median(x[k] for x in table[("dynvllm", c)]) for k in table[("dynvllm", c)][0]}
        v = {k: statistics.median(x[k] for x in table[("vllm", c)]) for k in table[("vllm", c)][0]}
        print(
            f"{c:<3d} {d['tok_s']:13.1f} {v['tok_s']:12.1f} {d['tok_s'] / v['tok_s']:7.2f}   "
            f"{d['ttft_p50_ms']:6.1f}/{v['ttft_p50_ms']:<6.1f}     "
            f"{d['ttft_p99_ms']:6.1f}/{v['ttft_p99_ms']:<6.1f}     "
            f"{d['itl_p50_ms']:5.2f}/{v['itl_p50_ms']:<5.2f}"
        )


if __name__ == "__main__":
    main()
