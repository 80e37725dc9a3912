#!/usr/bin/env python
"""Router index side by side: dynvllm's KV index vs NVIDIA Dynamo's Rust RadixTree, one process.

    PEERS=/tmp/peers .venv/bin/python scripts/bench_router_index.py [--rounds 3] [--plain | --copies]
        [--workers 1024] [--impls native,python]

Workload (= scripts/bench_router_cost.py): 1,024 workers, ~1M blocks of 32 tokens from 64 shared
system prompts plus unique tails, then 2,000 lookups of 4,096-token prompts, half sharing a
40-block prefix.

Both indexes live in this one interpreter (Dynamo's compiled module is loaded from
$PEERS/dynamo-venv, which `../shared/peers/dynamo_mocker.sh install` makes) and every round
interleaves them: ingest alternates chunks of 256 workload prompts between the two (each chunk
timed on its own; Dynamo's tree applies events on its own thread, so its chunk ends when a lookup
returns after them), and lookups alternate per prompt. Load from other processes then falls on
both sides alike, and the ratios printed per round compare like with like.

Both sides get what their routers receive on the wire, prepared outside the timing, and decode
it inside: Dynamo JSON events carrying per-block `tokens_hash`es (parsed in Rust), dynvllm the
msgpack batches of keys its workers relay (decoded as the frontend's subscriber does). Engine
block hashes chain over the tokens and are equal on every worker (Dynamo's tree requires that, as
vLLM gives with a fixed hash seed); a worker stores only blocks it does not hold yet, in runs that
name their parent. Every 10th stored prompt is later evicted from the GPU from a random block on
(tail first, as vLLM frees blocks): both sides get those removals.

dynvllm runs with offload tiers and image keys in (`--plain`: without): every 5th stored prompt
is also offloaded to the CPU tier (keyed by hash only, as vLLM's offloading connector reports
it; the evicted prompts are among them, so what the GPU drops stays there), and every 11th to
disk; every 8th stored prompt and lookup carries an image (its blocks keyed with the image's hash
from `extra_keys`). Dynamo's side has neither. Reported per side: ingest block events/s (stores
and removals, all tiers) in wall-clock time and per CPU-second of the process (Dynamo's tree
thread included), prefix lookup p50/p99 (block keys precomputed; dynvllm's is the tier-aware
lookup the cost reads, its GPU-only lookup timed beside it; Dynamo's `find_matches` alone, and
with the worker -> overlap dict its result builds when read, which is what dynvllm's lookup
returns), and for dynvllm its whole routing decision (prompt hashing + lookup + cost over all
the workers) and the worker-side keying rate.
dynvllm's index runs on each holders table named by `--impls` (default: the compiled one, if
built, and the pure-Python one; see `dynvllm.router.masks`), each its own router, interleaved with
Dynamo's in the same rounds; ratios are printed for each against Dynamo.
`--copies`: no GPU evictions, so the lower tiers hold copies of GPU blocks only (no worker's
prefix goes on through them: the tier-aware lookup should cost what the GPU-only one does).
"""

from __future__ import annotations

import argparse
import gc
import glob
import hashlib
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from loadgen import pct

BS, WORKERS, BLOCKS, PROMPT, DECISIONS, CHUNK = 32, 1024, 1_000_000, 4096, 2000, 256
OFFLOAD, EVICT, DISK, IMAGE, IMAGE_TOKENS = 5, 10, 11, 8, 64
MASK = (1 << 63) - 1
IMAGE_BYTES = random.Random(1).randbytes(4096)
# = hashing.image_uuid(hashing.image_hash(IMAGE_BYTES)), without importing dynvllm at module level
IMAGE_UUID = f"{int.from_bytes(hashlib.blake2b(IMAGE_BYTES, digest_size=8).digest(), 'big'):016x}"


def workload(
    plain: bool, evict: bool = True
) -> tuple[list[list[tuple[Any, ...]]], list[list[int]], random.Random]:
    """Per stored prompt, the engine events its worker emits, as vLLM would: blocks already in a
    tier are not stored there again (a prefix hit), runs of new blocks name their parent; engine
    hashes chain over tokens and image. Events:
    ("stored", worker, hashes, parent, tokens, extra_keys or None, medium)
    ("removed", worker, hashes, medium). And the lookup prompts."""
    rng = random.Random(0)
    shared = [[rng.randrange(500) for _ in range(2048)] for _ in range(64)]
    image_blocks = IMAGE_TOKENS // BS
    extra = [((IMAGE_UUID, -BS * b),) for b in range(image_blocks)]
    held: dict[tuple[int, str], set[int]] = {}
    out: list[list[tuple[Any, ...]]] = []
    blocks = 0
    while blocks < BLOCKS:
        i = len(out)
        w = rng.randrange(WORKERS)
        base = shared[rng.randrange(len(shared))][: BS * rng.randrange(1, 64)]
        tokens = base + [rng.randrange(500) for _ in range(PROMPT - len(base))]
        n = len(tokens) // BS
        image = not plain and i % IMAGE == 0
        # Equal on every worker: Dynamo's tree requires it (vLLM hashes with a fixed seed there).
        hashes, h = [], 0
        for b in range(n):
            h = hash((h, tuple(tokens[b * BS : (b + 1) * BS]), image and b < image_blocks)) & MASK
            hashes.append(h)
        evs: list[tuple[Any, ...]] = []
        media = ["GPU"]
        if not plain and i % OFFLOAD == 0:
            media.append("CPU")
        if not plain and i % DISK == 0:
            media.append("DISK")
        for medium in media:
            mine = held.setdefault((w, medium), set())
            b = 0
            while b < n:  # runs of blocks this tier does not hold yet
                if hashes[b] in mine:
                    b += 1
                    continue
                e = b
                while e < n and hashes[e] not in mine:
                    e += 1
                run = hashes[b:e]
                mine.update(run)
                if medium == "GPU":
                    parent = hashes[b - 1] if b else None
                    ex = extra[b:e] if image and b < image_blocks else None
                    evs.append(("stored", w, run, parent, tokens[b * BS : e * BS], ex, medium))
                else:  # offloading connectors report a store by hash only
                    evs.append(("stored", w, run, None, [], None, medium))
                b = e
        if evict and i % EVICT == 0:  # the GPU evicts the prompt's tail, last block first
            mine = held[(w, "GPU")]
            gone = [h for h in reversed(hashes[rng.randrange(n) :]) if h in mine]
            mine.difference_update(gone)
            if gone:
                evs.append(("removed", w, gone, "GPU"))
        out.append(evs)
        blocks += n
    prompts = []
    for i in range(DECISIONS):
        base = shared[rng.randrange(len(shared))][: BS * 40] if i % 2 else []
        prompts.append(base + [rng.randrange(500) for _ in range(PROMPT - len(base))])
    return out, prompts, rng


def load_dynamo(peers: Path) -> Any:
    """Dynamo's compiled module from its venv, without the venv's Python packages."""
    found = glob.glob(str(peers / "dynamo-venv/lib/python3*/site-packages/dynamo/_core*.so"))
    if not found:
        return None
    spec = importlib.util.spec_from_file_location("dynamo._core", found[0])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dynamo_events(engine: list[list[tuple[Any, ...]]]) -> tuple[list[list[tuple[int, bytes]]], int]:
    """Per workload prompt, the JSON events Dynamo's workers publish for their GPU caches (a
    tokens_hash per block; image blocks' hash takes the image in, as vLLM's block hash does)."""
    out, blocks, eid = [], 0, 0
    for evs in engine:
        mine = []
        for ev in evs:
            if ev[-1] != "GPU":
                continue
            if ev[0] == "stored":
                _, w, hashes, parent, tokens, ex, _ = ev
                blks = []
                for b, h in enumerate(hashes):
                    blk = tuple(tokens[b * BS : (b + 1) * BS])
                    th = hash((blk, ex[b]) if ex and b < len(ex) else blk) & MASK
                    blks.append({"block_hash": h, "tokens_hash": th})
                data = {"stored": {"parent_hash": parent, "blocks": blks}}
            else:
                w, hashes = ev[1], ev[2]
                data = {"removed": {"block_hashes": hashes}}
            mine.append((w, json.dumps({"event_id": eid, "data": data}).encode()))
            eid += 1
            blocks += len(hashes)
        out.append(mine)
    return out, blocks


def dynvllm_events(engine: list[list[tuple[Any, ...]]]) -> tuple[list[list[bytes]], int, float]:
    """Per workload prompt, the keyed batches dynvllm's workers relay; and the workers' keying rate."""
    from dynvllm.router.block_keys import BlockKeys
    from dynvllm.runtime.kv_topic import KV_EVENTS, KvEventBatch

    keyers: dict[int, BlockKeys] = {}
    seq: dict[int, int] = {}
    out, blocks = [], 0
    t0 = time.perf_counter()
    for evs in engine:  # what each worker does before relaying
        mine = []
        for ev in evs:
            w = ev[1]
            keyer = keyers.setdefault(w, BlockKeys())
            if ev[0] == "stored":
                _, _, hashes, parent, tokens, ex, medium = ev
                bs = BS if tokens else 0
                rev = keyer.translate(("stored", hashes, parent, tokens, bs, None, medium, ex))
            else:
                rev = keyer.translate(("removed", ev[2], ev[3]))
            if rev is None:
                continue
            seq[w] = seq.get(w, 0) + 1
            mine.append(KV_EVENTS.encode(KvEventBatch(f"w{w}", 0, seq[w], [list(rev)])))
            blocks += len(rev[1])
        out.append(mine)
    keying = blocks / (time.perf_counter() - t0)
    assert not any(k.orphans for k in keyers.values())
    return out, blocks, keying


def one_round(
    core: Any,
    dyn: list[Any],
    ours: list[Any],
    prompts: list[list[int]],
    rng: random.Random,
    image: bytes,
    impls: list[str],
) -> dict[str, Any]:
    from dynvllm.frontend.routing import Router
    from dynvllm.router import hashing, image_keys, masks
    from dynvllm.runtime.kv_topic import KV_EVENTS
    from dynvllm.settings import RouterSettings

    decode = KV_EVENTS.decode
    routers = {}
    for impl in impls:  # each router's index on its table (the variable is read when one is made)
        os.environ[masks.IMPL_ENV] = impl
        routers[impl] = Router(RouterSettings(router="kv"))
        made = routers[impl].index
        assert made is not None and made.impl == impl
    tree = core.RadixTree() if core is not None else None
    spent = {side: 0.0 for side in ["dynamo", *impls]}
    cpu = dict(spent)  # CPU seconds of the whole process (all threads)
    order = ["dynamo", *impls]
    for c, start in enumerate(range(0, len(ours), CHUNK)):
        for side in order[c % len(order) :] + order[: c % len(order)]:
            if side == "dynamo":
                if tree is None:
                    continue
                t, c0 = time.perf_counter(), time.process_time()
                for evs in dyn[start : start + CHUNK]:
                    for w, body in evs:
                        tree.apply_event(w, body)
                tree.find_matches([0])  # returns after the events queued before it are applied
                spent["dynamo"] += time.perf_counter() - t
                cpu["dynamo"] += time.process_time() - c0
            else:
                on_kv_events = routers[side].on_kv_events
                t, c0 = time.perf_counter(), time.process_time()
                for evs in ours[start : start + CHUNK]:
                    for b in evs:
                        on_kv_events(decode(b))
                spent[side] += time.perf_counter() - t
                cpu[side] += time.process_time() - c0

    def local_hashes(tokens: list[int]) -> list[int]:
        return [hash(tuple(tokens[s : s + BS])) & MASK for s in range(0, len(tokens) - BS + 1, BS)]

    rule = {"token_id": 1, "count": IMAGE_TOKENS}
    ours_keys = [
        image_keys.place(p, [image], rule, BS).keys(BS, None)
        if image and i % IMAGE == 0
        else hashing.chain(p, BS)
        for i, p in enumerate(prompts)
    ]
    dyn_keys = [local_hashes(p) for p in prompts]
    lat: dict[str, list[float]] = {"dynamo": [], "dynamo_scores": []}
    hits = {"dynamo": 0}
    extended = dict.fromkeys(impls, 0)  # lookups where some worker's prefix goes on through a tier
    lookups: dict[str, Any] = {}
    answers: dict[str, list[Any]] = {}
    for impl in impls:
        index = routers[impl].index
        assert index is not None
        lookups[impl], lookups[impl + " plain"] = index.lookup, index.overlaps
        lat[impl], lat[impl + " plain"], hits[impl], answers[impl] = [], [], 0, []
    sides = ["dynamo", *lookups]
    for i in range(len(prompts)):
        for side in sides[i % len(sides) :] + sides[: i % len(sides)]:  # each side as often in each place
            if side == "dynamo":
                if tree is None:
                    continue
                t = time.perf_counter()
                s = tree.find_matches(dyn_keys[i])
                found = time.perf_counter()
                scores = s.scores  # built on access: the worker -> overlap dict, as dynvllm returns
                lat[side].append((found - t) * 1000)
                lat["dynamo_scores"].append((time.perf_counter() - t) * 1000)
                hits[side] += bool(scores)
            elif side in hits:
                t = time.perf_counter()
                gpu, further = lookups[side](ours_keys[i])  # what the cost reads
                lat[side].append((time.perf_counter() - t) * 1000)
                hits[side] += bool(gpu or further)
                extended[side] += bool(further)
                answers[side].append((gpu, further))
            else:
                t = time.perf_counter()
                lookups[side](ours_keys[i])
                lat[side].append((time.perf_counter() - t) * 1000)
    assert all(answers[impl] == answers[impls[0]] for impl in impls), "the tables answered differently"
    candidates = [f"w{i}" for i in range(WORKERS)]
    loads = [rng.randrange(0, 200) for _ in candidates]
    dec: dict[str, list[float]] = {impl: [] for impl in impls}
    for impl in impls:
        router = routers[impl]
        router.load.active_blocks.update(zip(candidates, loads, strict=True))
        for i, p in enumerate(prompts):
            images = [image] if image and i % IMAGE == 0 else None
            t = time.perf_counter()
            router.choose(candidates, p, BS, None, images, rule)
            dec[impl].append((time.perf_counter() - t) * 1000)
    first = routers[impls[0]].index
    tiers_in = first is not None and first.tiered(ours_keys[1]) is not None
    del routers, router, first, tree
    gc.collect()
    out = {"spent": spent, "cpu": cpu, "lat": lat, "hits": hits, "decision": dec}
    return {**out, "tiers_in": tiers_in, "extended": extended}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=WORKERS, help="workers the blocks spread over")
    ap.add_argument("--plain", action="store_true", help="dynvllm without offload tiers and images")
    ap.add_argument(
        "--copies",
        action="store_true",
        help="no GPU evictions: the lower tiers hold copies of GPU blocks only",
    )
    ap.add_argument("--impls", default="", help="holders tables, comma-separated (default: native,python)")
    args = ap.parse_args()
    globals()["WORKERS"] = args.workers
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dynvllm.router import masks
    from dynvllm.router.index import tune_gc

    default = ["python"] if masks.NATIVE_MISSING else ["native", "python"]
    impls = args.impls.split(",") if args.impls else default

    peers = Path(os.environ.get("PEERS", "/tmp/peers"))
    core = load_dynamo(peers)
    if core is None:
        print(f"no Dynamo under {peers}/dynamo-venv: dynvllm only (../shared/peers/README.md installs it)")
    t0 = time.perf_counter()
    engine, prompts, rng = workload(args.plain, evict=not args.copies)
    dyn, dyn_blocks = dynamo_events(engine) if core is not None else ([], 0)
    ours, our_blocks, keying = dynvllm_events(engine)
    image = b"" if args.plain else IMAGE_BYTES
    del engine
    what = "plain" if args.plain else "tiers + images" + (", tiers hold copies only" if args.copies else "")
    messages = sum(len(evs) for evs in ours)
    tune_gc()  # as the frontend does when it routes by KV (also freezes the prepared events)
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f};"
        f" {WORKERS} workers; block events: dynvllm {our_blocks:,} ({what}),"
        f" Dynamo {dyn_blocks:,}; prepared in {time.perf_counter() - t0:.0f} s; worker keying"
        f" {keying / 1e6:.2f}M blocks/s; holders tables: {', '.join(impls)}"
        + (f" (no compiled table: {masks.NATIVE_MISSING})" if masks.NATIVE_MISSING else ""),
        flush=True,
    )
    rows = []
    for r in range(args.rounds):
        res = one_round(core, dyn, ours, prompts, rng, image, impls)
        lat, spent, load = res["lat"], res["spent"], os.getloadavg()[0]
        if core is not None:
            dynamo = {
                "ingest": dyn_blocks / spent["dynamo"],
                "ingest_cpu": dyn_blocks / res["cpu"]["dynamo"],
                "p50": pct(lat["dynamo"], 0.5),
                "p99": pct(lat["dynamo"], 0.99),
                "scores_p50": pct(lat["dynamo_scores"], 0.5),
                "scores_p99": pct(lat["dynamo_scores"], 0.99),
                "hits": res["hits"]["dynamo"],
            }
            rows.append({"round": r + 1, "side": "dynamo", "load": load, **dynamo})
            print(
                f"round {r + 1} Dynamo  ingest {dynamo['ingest'] / 1e6:.2f}M block events/s"
                f" ({dynamo['ingest_cpu'] / 1e6:.2f}M per CPU-second); lookup"
                f" p50 {dynamo['p50']:.3f} ms p99 {dynamo['p99']:.3f} ms (with its scores dict"
                f" p50 {dynamo['scores_p50']:.3f} p99 {dynamo['scores_p99']:.3f} ms);"
                f" hits {dynamo['hits']}/{DECISIONS}",
                flush=True,
            )
        for impl in impls:
            row = {
                "round": r + 1,
                "side": impl,
                "load": load,
                "ingest": our_blocks / spent[impl],
                "ingest_cpu": our_blocks / res["cpu"][impl],
                "batches": messages / spent[impl],
                "extended": res["extended"][impl],
                "p50": pct(lat[impl], 0.5),
                "p99": pct(lat[impl], 0.99),
                "plain_p50": pct(lat[impl + " plain"], 0.5),
                "plain_p99": pct(lat[impl + " plain"], 0.99),
                "decision_p50": pct(res["decision"][impl], 0.5),
                "decision_p99": pct(res["decision"][impl], 0.99),
                "hits": res["hits"][impl],
                "tiers_in": res["tiers_in"],
            }
            rows.append(row)
            print(
                f"round {r + 1} dynvllm ({impl} table) ingest {row['ingest'] / 1e6:.2f}M block events/s"
                f" ({row['ingest_cpu'] / 1e6:.2f}M per CPU-second; {row['batches']:,.0f} relay"
                f" batches/s); lookup (tier-aware) p50 {row['p50']:.3f} ms p99 {row['p99']:.3f} ms;"
                f" GPU-only lookup p50 {row['plain_p50']:.3f} p99 {row['plain_p99']:.3f} ms; decision"
                f" p50 {row['decision_p50']:.3f} p99 {row['decision_p99']:.3f} ms;"
                f" hits {row['hits']}/{DECISIONS}, {row['extended']} going on through a lower tier",
                flush=True,
            )
            if core is not None:
                ingest = row["ingest"] / dynamo["ingest"]
                ingest_cpu = row["ingest_cpu"] / dynamo["ingest_cpu"]
                p50, p99 = row["p50"] / dynamo["p50"], row["p99"] / dynamo["p99"]
                s50, s99 = row["p50"] / dynamo["scores_p50"], row["p99"] / dynamo["scores_p99"]
                print(
                    f"round {r + 1} {impl}: ingest {ingest:.2f}x Dynamo's (per CPU-second {ingest_cpu:.2f}x);"
                    f" lookup p50 {p50:.2f}x, p99 {p99:.2f}x Dynamo's find_matches (with its scores dict"
                    f" p50 {s50:.2f}x, p99 {s99:.2f}x); GPU-only lookup p99"
                    f" {row['plain_p99'] / dynamo['p99']:.2f}x; tier-aware lookup"
                    f" p50 {row['p50'] / row['plain_p50']:.2f}x the GPU-only one (load {load:.1f})",
                    flush=True,
                )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
