#!/usr/bin/env python
"""Router cost: KV-event ingest rate and decision latency at scale (pure router code).

Builds an index of --workers workers holding --blocks blocks in total (prefix trees of shared
system prompts plus unique tails, as the keyed events workers relay), then times decisions for --prompt-token
prompts, half of which share a cached prefix. Run: .venv/bin/python scripts/bench_router_cost.py
"""

from __future__ import annotations

import argparse
import os
import random
import time

from loadgen import pct

from dynvllm.frontend.routing import Router
from dynvllm.router.block_keys import BlockKeys
from dynvllm.router.index import tune_gc
from dynvllm.runtime.kv_topic import KvEventBatch
from dynvllm.settings import RouterSettings

BS = 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=1024)
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--decisions", type=int, default=2000)
    args = ap.parse_args()
    rng = random.Random(0)
    tune_gc()  # as the frontend does when it routes by KV
    router = Router(RouterSettings(router="kv"))
    shared = [[rng.randrange(500) for _ in range(2048)] for _ in range(64)]  # system prompts
    batches = []
    blocks = 0
    seq: dict[str, int] = {}
    keyers: dict[str, BlockKeys] = {}
    while blocks < args.blocks:
        w = f"w{rng.randrange(args.workers)}"
        base = shared[rng.randrange(len(shared))][: BS * rng.randrange(1, 64)]
        tokens = base + [rng.randrange(500) for _ in range(args.prompt_tokens - len(base))]
        n = len(tokens) // BS
        hashes = [rng.getrandbits(63) for _ in range(n)]
        seq[w] = seq.get(w, 0) + 1
        # Workers key their engine's events before relaying them; the router ingests keys.
        event = ("stored", hashes, None, tokens[: n * BS], BS, None)
        keyed = keyers.setdefault(w, BlockKeys()).translate(event)
        batches.append(KvEventBatch(w, 0, seq[w], [list(keyed)]))
        blocks += n
    del keyers
    t0 = time.perf_counter()
    for b in batches:
        router.on_kv_events(b)
    ingest = blocks / (time.perf_counter() - t0)
    candidates = [f"w{i}" for i in range(args.workers)]
    for c in candidates:
        router.load.active_blocks[c] = rng.randrange(0, 200)
    lat = []
    for i in range(args.decisions):
        base = shared[rng.randrange(len(shared))][: BS * 40] if i % 2 else []
        prompt = base + [rng.randrange(500) for _ in range(args.prompt_tokens - len(base))]
        t = time.perf_counter()
        router.choose(candidates, prompt, BS)
        lat.append((time.perf_counter() - t) * 1000)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cpus: {args.workers} workers, "
        f"{router.index.block_count():,} indexed blocks, {args.prompt_tokens}-token prompts"
    )
    print(f"ingest {ingest:,.0f} blocks/s; decision p50 {pct(lat, 0.5):.3f} ms, p99 {pct(lat, 0.99):.3f} ms")


if __name__ == "__main__":
    main()
