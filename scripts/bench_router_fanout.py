#!/usr/bin/env python
"""How the KV event stream fans out to N router replicas, measured on real nats-server.

Workers publish their keyed batches once on `NS.events.kv`; NATS delivers each batch to every
frontend. Here one publisher stands for WORKERS workers (batches of KEYS block keys each, as
workers relay them) and N subscriber processes stand for N frontends: each decodes every batch
and applies it to a `KvIndex`, as a frontend's router does. Two layouts:

- `direct`: all replicas on one nats-server (one host, or a cluster member per host: a cluster
  forwards a subject once per member that has subscribers).
- `leaf`: the workers' server is a hub; the replicas connect to a leaf node (the nats-server a
  second host would run): the stream crosses to the leaf once, however many replicas it serves.

Reported per run: each replica's ingest (batches/s, blocks/s, from its first to its last batch),
batches lost (none expected), and the servers' message counters (`/varz`): what the hub sent out.

    .venv/bin/python scripts/bench_router_fanout.py [--replicas 1,2,4,8] [--batches 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import free_port

SUBJECT = "bench.events.kv"


def nats_server() -> str:
    found = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    return os.environ.get("NATS_SERVER", found)


def start_server(conf: str, folder: Path, name: str) -> subprocess.Popen:
    path = folder / f"{name}.conf"
    path.write_text(conf)
    return subprocess.Popen(
        [nats_server(), "-c", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def varz(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/varz", timeout=5) as r:
        return json.load(r)


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


# ---- a replica: subscribe, decode, index -------------------------------------------------
async def replica(url: str, total: int, ready: str) -> None:
    import msgpack
    import nats

    from dynvllm.router.index import KvIndex

    index = KvIndex()
    apply, unpack = index.apply, msgpack.unpackb
    got = 0
    blocks = 0
    first = last = 0.0
    done = asyncio.Event()

    async def on_msg(msg) -> None:  # type: ignore[no-untyped-def]
        nonlocal got, blocks, first, last
        batch = unpack(msg.data, raw=False)
        worker = (batch["instance_id"], batch["dp_rank"])
        for ev in batch["events"]:
            apply(worker, ev)
            blocks += len(ev[1])
        got += 1
        if got == 1:
            first = time.perf_counter()
        last = time.perf_counter()
        if got >= total:
            done.set()

    nc = await nats.connect(url, pending_size=1 << 30)
    await nc.subscribe(SUBJECT, cb=on_msg, pending_msgs_limit=10_000_000, pending_bytes_limit=1 << 31)
    await nc.flush()
    Path(ready).touch()
    try:
        await asyncio.wait_for(done.wait(), 300)
    except TimeoutError:
        pass
    await asyncio.sleep(0.5)  # stragglers
    span = max(last - first, 1e-9)
    print(json.dumps({"got": got, "blocks": blocks, "batches_s": got / span, "blocks_s": blocks / span}))
    await nc.close()


# ---- the workers: one publisher -------------------------------------------------------------
def batches(n: int, workers: int, keys: int) -> list[bytes]:
    import msgpack

    rng = random.Random(0)
    seq = [0] * workers
    out = []
    for i in range(n):
        w = i % workers
        seq[w] += 1
        ev = ["stored", [rng.getrandbits(63) for _ in range(keys)]]
        if i % 4 == 3:  # the engines evict about as fast as they store
            ev = ["removed", ev[1][: keys // 2]]
        out.append(msgpack.packb({"instance_id": f"w{w}", "dp_rank": 0, "seq": seq[w], "events": [ev]}))
    return out


async def publish(url: str, payloads: list[bytes]) -> float:
    import nats

    nc = await nats.connect(url, pending_size=1 << 28)
    t0 = time.perf_counter()
    for i, p in enumerate(payloads):
        await nc.publish(SUBJECT, p)
        if i % 2000 == 0:
            await nc.flush()
    await nc.flush()
    took = time.perf_counter() - t0
    await nc.close()
    return took


def run(layout: str, n: int, args: argparse.Namespace, payloads: list[bytes], folder: Path) -> dict:
    hub, hub_m = free_port(), free_port()
    servers = []
    conf = f"listen: 127.0.0.1:{hub}\nhttp: 127.0.0.1:{hub_m}\nmax_pending: 1GB\nmax_payload: 8MB\n"
    sub_url, leaf_m = f"nats://127.0.0.1:{hub}", None
    if layout == "leaf":
        leaf_listen, leaf, leaf_m = free_port(), free_port(), free_port()
        conf += f"leafnodes {{ listen: 127.0.0.1:{leaf_listen} }}\n"
        servers.append(start_server(conf, folder, "hub"))
        wait_port(hub)
        leaf_conf = (
            f"listen: 127.0.0.1:{leaf}\nhttp: 127.0.0.1:{leaf_m}\nmax_pending: 1GB\nmax_payload: 8MB\n"
            f'leafnodes {{ remotes: [{{ url: "nats://127.0.0.1:{leaf_listen}" }}] }}\n'
        )
        servers.append(start_server(leaf_conf, folder, "leaf"))
        wait_port(leaf)
        sub_url = f"nats://127.0.0.1:{leaf}"
        time.sleep(1.0)  # the leaf connection
    else:
        servers.append(start_server(conf, folder, "hub"))
        wait_port(hub)
    procs, readies = [], []
    try:
        for i in range(n):
            ready = folder / f"ready-{layout}-{n}-{i}"
            readies.append(ready)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--replica",
                        sub_url,
                        "--total",
                        str(len(payloads)),
                        "--ready",
                        str(ready),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                    env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                )
            )
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in readies) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0 if layout == "leaf" else 0.2)  # interest reaches the hub
        base = varz(hub_m)
        took = asyncio.run(publish(f"nats://127.0.0.1:{hub}", payloads))
        outs = [json.loads(p.communicate(timeout=400)[0].strip().splitlines()[-1]) for p in procs]
        after = varz(hub_m)
        return {
            "layout": layout,
            "replicas": n,
            "publish_batches_s": len(payloads) / took,
            "min_batches_s": min(o["batches_s"] for o in outs),
            "min_blocks_s": min(o["blocks_s"] for o in outs),
            "lost": sum(len(payloads) - o["got"] for o in outs),
            "hub_out_msgs": after["out_msgs"] - base["out_msgs"],
            "hub_out_mb": (after["out_bytes"] - base["out_bytes"]) / 1e6,
        }
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for s in servers:
            s.terminate()
            s.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", default="1,2,4,8")
    ap.add_argument("--layouts", default="direct,leaf")
    ap.add_argument("--batches", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--keys", type=int, default=32, help="block keys per stored batch")
    ap.add_argument("--replica", help=argparse.SUPPRESS)
    ap.add_argument("--total", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ready", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.replica:
        asyncio.run(replica(args.replica, args.total, args.ready))
        return
    payloads = batches(args.batches, args.workers, args.keys)
    size = sum(map(len, payloads)) / len(payloads)
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')} {os.cpu_count()} cpus; {args.batches} batches from "
        f"{args.workers} workers, {args.keys} keys per store ({size:.0f} bytes a batch)",
        flush=True,
    )
    folder = Path(tempfile.mkdtemp(prefix="fanout"))
    for layout in args.layouts.split(","):
        for n in [int(x) for x in args.replicas.split(",")]:
            r = run(layout, n, args, payloads, folder)
            print(
                f"{layout:6s} replicas {n}: publish {r['publish_batches_s']:,.0f} batches/s; slowest replica "
                f"{r['min_batches_s']:,.0f} batches/s = {r['min_blocks_s'] / 1e6:.2f}M blocks/s; lost "
                f"{r['lost']}; hub sent {r['hub_out_msgs']:,} msgs ({r['hub_out_mb']:.1f} MB)",
                flush=True,
            )
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
