#!/usr/bin/env python
"""Router index side by side: dynvllm's KV index vs NVIDIA Dynamo's Rust RadixTree, one workload.

    PEERS=/tmp/peers .venv/bin/python scripts/bench_router_index.py [--rounds 2]

Workload (= scripts/bench_router_cost.py): 1,024 workers, ~1M blocks of 32 tokens from 64 shared
system prompts plus unique tails, then 2,000 lookups of 4,096-token prompts, half sharing a
40-block prefix. Each side runs in its own interpreter (Dynamo's from $PEERS/dynamo-venv, which
`../shared/peers/dynamo_mocker.sh install` makes), alternating, ROUNDS times.

Both sides get what their routers receive on the wire, prepared outside the timing: Dynamo JSON
events carrying per-block `tokens_hash`es (parsed in Rust), dynvllm the keyed batches its workers
relay. Reported: ingest blocks/s, prefix lookup p50/p99 (block keys precomputed), and for dynvllm
its whole routing decision (prompt hashing + overlap + cost over all workers) and the worker-side
keying rate (what one worker spends turning its engine's events into keys).

dynvllm runs with tiers and image keys in: every OFFLOAD-th stored prompt is also offloaded to
the CPU tier (a second event with medium CPU, keyed by hash only as vLLM's connector reports
it; its blocks count in the ingest rate), so every lookup is the tier-aware one (GPU + CPU
depths); every IMAGE-th stored prompt and decision carries an image (its blocks keyed with the
image's hash from `extra_keys`). Dynamo's side has neither. `--plain` runs dynvllm without
them (what they cost).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

BS, WORKERS, BLOCKS, PROMPT, DECISIONS = 32, 1024, 1_000_000, 4096, 2000
OFFLOAD, IMAGE, IMAGE_TOKENS = 5, 8, 64
if "--plain" in sys.argv:
    OFFLOAD = IMAGE = 1 << 40  # never


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def workload():  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    shared = [[rng.randrange(500) for _ in range(2048)] for _ in range(64)]
    batches, blocks = [], 0
    while blocks < BLOCKS:
        w = rng.randrange(WORKERS)
        base = shared[rng.randrange(len(shared))][: BS * rng.randrange(1, 64)]
        tokens = base + [rng.randrange(500) for _ in range(PROMPT - len(base))]
        n = len(tokens) // BS
        batches.append((w, tokens[: n * BS], [rng.getrandbits(63) for _ in range(n)]))
        blocks += n
    prompts = []
    for i in range(DECISIONS):
        base = shared[rng.randrange(len(shared))][: BS * 40] if i % 2 else []
        prompts.append(base + [rng.randrange(500) for _ in range(PROMPT - len(base))])
    return batches, blocks, prompts, rng


def run_dynamo(batches, blocks, prompts, _rng):  # type: ignore[no-untyped-def]
    from dynamo.llm import RadixTree

    def local_hashes(tokens):  # type: ignore[no-untyped-def]
        starts = range(0, len(tokens) - BS + 1, BS)
        return [hash(tuple(tokens[s : s + BS])) & 0x7FFFFFFFFFFFFFFF for s in starts]

    tree = RadixTree()
    evs = []
    for i, (w, tokens, hashes) in enumerate(batches):
        pairs = zip(hashes, local_hashes(tokens), strict=True)
        blks = [{"block_hash": h, "tokens_hash": lh} for h, lh in pairs]
        body = {"event_id": i, "data": {"stored": {"parent_hash": None, "blocks": blks}}}
        evs.append((w, json.dumps(body).encode()))
    t0 = time.perf_counter()
    for w, b in evs:
        tree.apply_event(w, b)
    tree.find_matches([0])  # the tree applies events on its own thread: wait until they are in
    ingest = blocks / (time.perf_counter() - t0)
    lat, hits = [], 0
    for k in [local_hashes(p) for p in prompts]:
        t = time.perf_counter()
        s = tree.find_matches(k)
        lat.append((time.perf_counter() - t) * 1000)
        hits += bool(s.scores)
    return {"ingest": ingest, "lookup": lat, "hits": hits}


def run_dynvllm(batches, blocks, prompts, rng):  # type: ignore[no-untyped-def]
    from dynvllm.frontend.routing import Router
    from dynvllm.router import hashing
    from dynvllm.router.block_keys import BlockKeys
    from dynvllm.router.index import tune_gc
    from dynvllm.runtime.kv_topic import KvEventBatch
    from dynvllm.settings import RouterSettings

    tune_gc()  # as the frontend does when it routes by KV
    router = Router(RouterSettings(router="kv"))
    keyers: dict[int, BlockKeys] = {}
    seq: dict[int, int] = {}
    evs = []
    image = os.urandom(4096)
    uuid = hashing.image_uuid(hashing.image_hash(image))
    extra = [((uuid, -BS * b),) for b in range(IMAGE_TOKENS // BS)]
    t0 = time.perf_counter()
    for i, (w, tokens, hashes) in enumerate(batches):  # what each worker does before relaying
        keyer = keyers.setdefault(w, BlockKeys())
        if i % IMAGE == 0:  # an image in the first blocks, as vLLM names it in `extra_keys`
            ev = keyer.translate(("stored", hashes, None, tokens, BS, None, "GPU", extra))
        else:
            ev = keyer.translate(("stored", hashes, None, tokens, BS, None))
        seq[w] = seq.get(w, 0) + 1
        evs.append(KvEventBatch(f"w{w}", 0, seq[w], [list(ev)]))
        if i % OFFLOAD == 0:  # the connector offloads the prompt: a store by hash only
            off = keyer.translate(("stored", hashes, None, [], 0, None, "CPU"))
            seq[w] += 1
            evs.append(KvEventBatch(f"w{w}", 0, seq[w], [list(off)]))
            blocks += len(hashes)
    keying = blocks / (time.perf_counter() - t0)
    del keyers
    t0 = time.perf_counter()
    for b in evs:
        router.on_kv_events(b)
    ingest = blocks / (time.perf_counter() - t0)
    index = router.index
    tiers_in = index is not None and index.tiered(hashing.chain(prompts[1], BS)) is not None
    assert index is not None and tiers_in == (OFFLOAD == 5)
    lat, hits = [], 0
    for k in [hashing.chain(p, BS) for p in prompts]:
        t = time.perf_counter()
        s = index.tiered(k)  # what the cost reads
        if s is None:
            s = index.overlaps(k)
        lat.append((time.perf_counter() - t) * 1000)
        hits += bool(s)
    candidates = [f"w{i}" for i in range(WORKERS)]
    for c in candidates:
        router.load.active_blocks[c] = rng.randrange(0, 200)
    dec = []
    rule = {"token_id": 1, "count": IMAGE_TOKENS}
    for i, p in enumerate(prompts):
        images = [image] if i % IMAGE == 0 else None
        t = time.perf_counter()
        router.choose(candidates, p, BS, None, images, rule)
        dec.append((time.perf_counter() - t) * 1000)
    return {"ingest": ingest, "lookup": lat, "hits": hits, "decision": dec, "keying": keying}


def side(name: str) -> None:
    data = workload()
    r = (run_dynamo if name == "dynamo" else run_dynvllm)(*data)
    out = {
        "side": name,
        "blocks": data[1],
        "ingest": r["ingest"],
        "lookup_p50": pct(r["lookup"], 0.5),
        "lookup_p99": pct(r["lookup"], 0.99),
        "hits": r["hits"],
    }
    if "decision" in r:
        out.update(keying=r["keying"])
        out.update(decision_p50=pct(r["decision"], 0.5), decision_p99=pct(r["decision"], 0.99))
    print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--side", choices=["dynvllm", "dynamo"], help="run one side in this interpreter")
    ap.add_argument("--plain", action="store_true", help="dynvllm without offload tiers and images")
    args = ap.parse_args()
    if args.side:
        side(args.side)
        return
    peers = Path(os.environ.get("PEERS", "/tmp/peers"))
    dynamo_py = peers / "dynamo-venv/bin/python"
    pythons = {"dynvllm": sys.executable, "dynamo": str(dynamo_py)}
    if not dynamo_py.exists():
        print(f"no {dynamo_py}: dynvllm only (see ../shared/peers/README.md to install Dynamo)")
        del pythons["dynamo"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {os.cpu_count()} cpus, {WORKERS} workers, ~{BLOCKS:,} blocks")
    results: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        order = list(pythons) if r % 2 == 0 else list(reversed(pythons))
        for name in order:
            out = subprocess.run(
                [pythons[name], __file__, "--side", name, *(["--plain"] if args.plain else [])],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results.setdefault(name, []).append(res)
            line = (
                f"round {r + 1} {name:8s} ingest {res['ingest'] / 1e6:.2f}M blocks/s; lookup p50 "
                f"{res['lookup_p50']:.3f} ms p99 {res['lookup_p99']:.3f} ms; hits {res['hits']}/{DECISIONS}"
            )
            if "decision_p99" in res:
                line += (
                    f"; decision p50 {res['decision_p50']:.3f} ms p99 {res['decision_p99']:.3f} ms;"
                    f" worker keying {res['keying'] / 1e6:.2f}M blocks/s"
                )
            print(line, flush=True)
    if len(results) == 2:
        for r in range(args.rounds):
            a, b = results["dynvllm"][r], results["dynamo"][r]
            print(
                f"round {r + 1}: ingest {a['ingest'] / b['ingest']:.2f}x Dynamo's; lookup p99 "
                f"{a['lookup_p99']:.3f} vs {b['lookup_p99']:.3f} ms"
            )


if __name__ == "__main__":
    main()
