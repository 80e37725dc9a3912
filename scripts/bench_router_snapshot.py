#!/usr/bin/env python
"""Warm restart at scale: a frontend loading a live peer's index (`dynvllm.router.snapshot`).

    .venv/bin/python scripts/bench_router_snapshot.py [--workers 64] [--blocks 1000000] [--nats]

Builds a warm router's index (WORKERS workers, BLOCKS blocks in all: 64 system prompts of 40
blocks each cached on 8 workers, the rest unique tails), then times each step of a bootstrap:
the peer taking and encoding its index (as it answers, message by message), the new frontend
decoding it, loading it and cutting over to 10,000 buffered event batches. With `--nats` the
messages also travel through a local nats-server (request, chunked replies to an inbox).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from dynvllm.frontend.routing import Router
from dynvllm.router import snapshot as snap
from dynvllm.router.index import tune_gc
from dynvllm.runtime.kv_topic import KvEventBatch
from dynvllm.settings import RouterSettings


def warm_router(workers: int, blocks: int) -> Router:
    rng = random.Random(0)
    router = Router(RouterSettings(router="kv"))
    systems = [[rng.getrandbits(63) for _ in range(40)] for _ in range(64)]
    names = [f"{w:012x}" for w in range(workers)]
    seq = dict.fromkeys(names, 0)
    stored = 0
    for i, keys in enumerate(systems):
        for w in rng.sample(names, min(8, workers)):
            seq[w] += 1
            router.on_kv_events(KvEventBatch(w, 0, seq[w], [["stored", keys]]))
            stored += len(keys)
        del i
    while stored < blocks:
        w = names[rng.randrange(workers)]
        n = min(128, blocks - stored)
        seq[w] += 1
        router.on_kv_events(KvEventBatch(w, 0, seq[w], [["stored", [rng.getrandbits(63) for _ in range(n)]]]))
        stored += n
    return router


def buffered_batches(router: Router, n: int) -> list[KvEventBatch]:
    """Event batches that arrive while the snapshot travels: half already in it, half newer."""
    rng = random.Random(1)
    seqs = dict(router.policy._relay_seq)  # type: ignore[attr-defined]
    workers = list(seqs)
    out = []
    for i in range(n):
        iid, rank = workers[i % len(workers)]
        seqs[(iid, rank)] += 1
        out.append(KvEventBatch(iid, rank, seqs[(iid, rank)], [["stored", [rng.getrandbits(63)]]]))
    for b in out[: n // 2]:
        router.on_kv_events(b)
    return out


async def over_nats(messages: list[bytes]) -> float:
    """Seconds for the chunked reply to travel from a responder to a requester."""
    from dynvllm.runtime import nats as natsrt
    from dynvllm.settings import RuntimeSettings

    with natsrt.EmbeddedNats() as server:
        rt = RuntimeSettings(nats_url=server.url)
        responder, requester = await natsrt.connect(rt), await natsrt.connect(rt)

        async def answer(msg) -> None:
            for data in messages:
                await responder.publish(msg.reply, data)
            await responder.flush()

        await responder.subscribe("bench.snapshot", cb=answer)
        await responder.flush()
        inbox = requester.new_inbox()
        sub = await requester.subscribe(inbox)
        receiver = snap.Receiver()
        t0 = time.perf_counter()
        await requester.publish("bench.snapshot", b"", reply=inbox)
        while not receiver.feed((await sub.next_msg(timeout=30)).data):
            pass
        elapsed = time.perf_counter() - t0
        await responder.close()
        await requester.close()
        return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--limit", type=int, default=1 << 20, help="bytes per message (NATS max_payload)")
    ap.add_argument("--nats", action="store_true", help="also send the messages through nats-server")
    args = ap.parse_args()
    t = time.perf_counter()
    warm = warm_router(args.workers, args.blocks)
    tune_gc()
    assert warm.index is not None
    built = time.perf_counter() - t
    print(f"warm index: {warm.index.block_count():,} blocks on {args.workers} workers ({built:.1f} s)")
    buffered = buffered_batches(warm, 10_000)

    t0 = time.perf_counter()
    parts = warm.policy.snapshot()
    assert parts is not None
    messages = list(snap.encode(parts, args.limit))
    t1 = time.perf_counter()
    new = Router(RouterSettings(router="kv"))
    new.begin_bootstrap()
    for b in buffered:
        new.on_kv_events(b)
    t2 = time.perf_counter()
    loaded = snap.decode(messages)
    t3 = time.perf_counter()
    longest, last = 0.0, t3
    for _ in new.end_bootstrap_steps(loaded):  # the frontend's event loop turns between steps
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    t4 = time.perf_counter()
    longest = max(longest, t4 - last)
    assert new.index is not None and new.index.block_count() == warm.index.block_count() + 10_000 // 2
    size = sum(map(len, messages))
    print(
        f"snapshot: {len(messages)} messages, {size / 1e6:.1f} MB ({size / loaded.blocks:.1f} bytes a block)"
    )
    print(f"peer: take + encode      {1000 * (t1 - t0):8.0f} ms")
    print(f"new:  decode             {1000 * (t3 - t2):8.0f} ms")
    gaps = new.policy.gaps  # type: ignore[attr-defined]
    print(
        f"new:  load + cut over    {1000 * (t4 - t3):8.0f} ms"
        f"  (longest step {1000 * longest:.0f} ms, {gaps} gaps)"
    )
    total = (t1 - t0) + (t4 - t2)
    if args.nats:
        wire = asyncio.run(over_nats(messages))
        print(f"nats: request + chunks  {1000 * wire:8.0f} ms")
        total += wire
    print(f"total                    {1000 * total:8.0f} ms")


if __name__ == "__main__":
    main()
