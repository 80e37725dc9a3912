#!/usr/bin/env python
"""What one shared routing decision costs each side, in one process, away from NATS and HTTP.

P peer frontends route requests (recorded once with a real kv router over workers that hold the
system prompts); each request's started, grew (`--grows` output blocks) and finished records go
through its `Outbox` (the publisher's wake-ups modelled: a batch per peer per INTERVAL of
simulated time that has a started record, or a lingering one due). One receiving frontend
decodes every batch and applies it to its real `Load` and `KvIndex` (its predictions expire as
simulated time passes, as its own routing would make them). Reported, per request of a peer:
  sender    its records + the batch's share of `batch()` and its encoding (CPU us)
  decode    the receiver's msgpack decode of the batch
  apply     `Peers.apply` (+ expiring the predictions it made), all records of the request
and the bytes on the wire, records and batches per request, and `relayed`: the messages per
request a receiver would get if a relay forwarded all peers' batches of each interval as one
(the relay receiving every batch itself). Each round runs the sides named by --sides in turn,
alternating their order (ABAB, BABA); `head` is `dynvllm/router/replicas.py` as committed
(`git show HEAD:...`), `new` the working tree's.

    .venv/bin/python scripts/bench_share_records.py [--peers 7] [--rate 1000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import msgpack

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dynvllm.frontend.routing import Router  # noqa: E402
from dynvllm.router import hashing  # noqa: E402
from dynvllm.settings import RouterSettings  # noqa: E402

BS = 32


def load_side(name: str) -> ModuleType:
    """The replicas module of a side: `new` (working tree) or a git revision's (`head`: HEAD)."""
    if name == "new":
        import dynvllm.router.replicas as mod

        return mod
    rev = "HEAD" if name == "head" else name
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:dynvllm/router/replicas.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"replicas_{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"replicas_{name}", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (its dataclasses look their module up there)
    spec.loader.exec_module(mod)
    return mod


def workload(args, seed: int) -> tuple[list[str], list[list[int]], list[tuple[str, list[int]]]]:
    """Workers, the system prompts' keys, and each peer request's (worker, keys), chosen by a kv
    router that knows where the system prompts are cached."""
    rng = random.Random(seed)
    workers = [f"{i:032x}" for i in range(args.workers)]
    systems = [[rng.randrange(3, 500) for _ in range(args.system_tokens)] for _ in range(args.systems)]
    chains = [hashing.chain(s, BS) for s in systems]
    router = Router(RouterSettings(router="kv"))
    seed_systems(router, workers, chains)
    requests = []
    for _ in range(args.requests):
        if rng.random() < args.shared:
            prompt = systems[rng.randrange(len(systems))] + [rng.randrange(3, 500) for _ in range(48)]
        else:
            prompt = [rng.randrange(3, 500) for _ in range(128)]
        pick = router.choose(workers, prompt, BS)
        requests.append((pick.worker, list(pick.keys)))
    return workers, chains, requests


def seed_systems(router: Router, workers: list[str], chains: list[list[int]]) -> None:
    """The system prompts cached on the workers in turn, as the router's index knows them."""
    assert router.index is not None
    for i, keys in enumerate(chains):
        router.index.apply((workers[i % len(workers)], 0), ("stored", keys))


def timeline(args, n: int) -> list[tuple[float, int, int, int]]:
    """(time, peer, request, 0 start / 1 finish / 2 output grew a block) for n requests spread
    over the peers; `--grows` blocks of output each, evenly over its time in flight."""
    rng = random.Random(1)
    events = []
    gap = args.peers / args.rate  # each peer's mean gap between requests
    t = [0.0] * args.peers
    for i in range(n):
        p = i % args.peers
        t[p] += rng.expovariate(1 / gap)
        took = args.duration * rng.uniform(0.5, 1.5)
        events.append((t[p], p, i, 0))
        events.extend((t[p] + took * (g + 1) / (args.grows + 1), p, i, 2) for g in range(args.grows))
        events.append((t[p] + took, p, i, 1))
    events.sort()
    return events


def run_side(mod: ModuleType, args, work, events) -> dict[str, float]:
    workers, systems, requests = work
    receiver = Router(RouterSettings(router="kv"))
    seed_systems(receiver, workers, systems)
    assert receiver.index is not None
    peers = mod.Peers("recv", receiver.load, receiver.policy, silence=1e9)
    receiver.peers = peers
    # When each peer's publisher is due: now (a started record) or at a time (a lingering one).
    due_now = [False] * args.peers
    due_at = [math.inf] * args.peers
    clock_now = [0.0]

    def outbox(p: int):
        def wake() -> None:
            due_now[p] = True

        def wake_later(delay: float) -> None:
            due_at[p] = clock_now[0] + delay

        params = inspect.signature(mod.Outbox).parameters
        if "clock" in params:
            return mod.Outbox(
                f"peer{p}",
                wake,
                alone=False,
                wake_later=wake_later,
                linger=args.linger,
                clock=lambda: clock_now[0],
            )
        return mod.Outbox(f"peer{p}", wake, alone=False)

    outboxes = [outbox(p) for p in range(args.peers)]
    for box in outboxes:  # each is told by the others and the receiver
        box.peers = args.peers
    lingers = "wake_later" in inspect.signature(mod.Outbox).parameters
    blocks = float(len(requests[0][1]))
    tickets: dict[int, int] = {}
    wire: list[list[bytes]] = []  # per interval, the batches sent

    def release(r: int) -> None:  # the sender's own Load (not timed: it is paid unshared too)
        pass

    send = 0.0
    clock = time.process_time
    i, tick = 0, args.interval
    # Sender: records as requests start and end, a batch per peer per interval that has any.
    while i < len(events):
        now: list[bytes] = []
        t0 = clock()
        while i < len(events) and events[i][0] < tick:
            clock_now[0], p, r, kind = events[i]
            box = outboxes[p]
            if kind == 0:
                worker, keys = requests[r]
                tickets[r] = box.started(worker, 0, blocks, keys)
            elif kind == 2:
                if lingers:  # as `Router.grow` hands it over
                    box.grew(tickets[r], 1, functools.partial(release, r))
                else:
                    box.grew(tickets[r], 1)
            elif lingers:  # as `Router.finished` hands it over
                box.finished(tickets.pop(r), functools.partial(release, r))
            else:
                box.finished(tickets.pop(r))
            i += 1
        for p, box in enumerate(outboxes):
            if due_now[p] or due_at[p] <= tick:
                due_now[p], due_at[p] = False, math.inf
                batch = box.batch()
                if batch is not None:
                    now.append(msgpack.packb(batch))
        send += clock() - t0
        wire.append(now)
        tick += args.interval
    decode = apply = 0.0
    records = nbytes = 0
    unpackb = msgpack.unpackb
    index = receiver.index
    for step, batches in enumerate(wire):
        now_s = (step + 1) * args.interval
        for data in batches:
            nbytes += len(data)
            t0 = clock()
            batch = unpackb(data, raw=False)
            t1 = clock()
            records += len(batch[2])
            peers.apply(batch, now_s)
            t2 = clock()
            decode += t1 - t0
            apply += t2 - t1
        t0 = clock()
        index.expire(now_s)  # the receiver's own routing expires predictions as time goes on
        apply += clock() - t0
    n = len(requests)
    return {
        "sender_us": send / n * 1e6,
        "decode_us": decode / n * 1e6,
        "apply_us": apply / n * 1e6,
        "receiver_us": (decode + apply) / n * 1e6,
        "bytes": nbytes / n,
        "records": records / n,
        "batches": sum(len(b) for b in wire) / n,
        # What a receiver would get from a relay forwarding all peers' batches as one message per
        # interval (the relay itself receiving every batch): messages per request of a peer.
        "relayed": sum(1 for b in wire if b) / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sides", default="head,new")
    ap.add_argument("--peers", type=int, default=7, help="frontends sending to the receiver")
    ap.add_argument("--rate", type=float, default=1000.0, help="requests/s of all peers together")
    ap.add_argument("--duration", type=float, default=0.05, help="seconds a request is in flight (mean)")
    ap.add_argument("--interval", type=float, default=0.002, help="seconds between a peer's batches")
    ap.add_argument("--linger", type=float, default=0.02, help="`Outbox.linger` of the new side")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--grows", type=int, default=0, help="output blocks of each request")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--systems", type=int, default=16)
    ap.add_argument("--system-tokens", type=int, default=400)
    ap.add_argument("--shared", type=float, default=0.5, help="share of prompts over a system prompt")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    sides = {name: load_side(name) for name in args.sides.split(",")}
    work = workload(args, 0)
    events = timeline(args, len(work[2]))
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for name in order:
            row = run_side(sides[name], args, work, events)
            rows[name].append(row)
            cells = "  ".join(f"{k} {v:.2f}" for k, v in row.items())
            print(f"round {r + 1} {name:5s} {cells}", flush=True)
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M')}, {args.peers} peers, {args.rate:.0f} requests/s in all, "
        f"batches every {args.interval * 1000:g} ms, {args.requests} requests of {args.grows} output "
        f"blocks ({args.shared:.0%} over "
        f"{args.systems} system prompts of {args.system_tokens} tokens, the rest 128 tokens), "
        f"{args.workers} workers; medians of {args.rounds} rounds, CPU us per request of a peer"
    )
    keys = ["sender_us", "decode_us", "apply_us", "receiver_us", "bytes", "records", "batches", "relayed"]
    print(f"{'side':6s}" + "".join(f"{k:>13s}" for k in keys))
    for name, mine in rows.items():
        print(f"{name:6s}" + "".join(f"{statistics.median(m[k] for m in mine):13.2f}" for k in keys))


if __name__ == "__main__":
    main()
