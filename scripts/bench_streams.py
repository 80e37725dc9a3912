#!/usr/bin/env python
"""Streaming overhead over loopback: dynvllm's direct-socket streams vs NATS request/stream.

Both transports carry the same msgpack deltas from a handler in a server process to a client
in this process. Reported per transport: deltas/s with 1 stream and with 32 concurrent
streams, added latency per delta (server yield -> client receive) p50/p99, call set-up time
(call -> first delta) p50. Run: .venv/bin/python scripts/bench_streams.py [--deltas N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

import msgpack
from loadgen import pct

SERVER = r"""
import asyncio, sys, time, msgpack
from dynvllm.runtime.streams import StreamServer
from dynvllm.runtime import nats as natsrt
from dynvllm.settings import RuntimeSettings

async def deltas(p):
    gap = p.get("gap", 0)
    for i in range(p["n"]):
        if gap:
            await asyncio.sleep(gap)
        yield [i, time.perf_counter_ns()]

async def main(url):
    server = StreamServer({"deltas": deltas})
    port = await server.start()
    nc = await natsrt.connect(RuntimeSettings(nats_url=url))
    async def on_req(msg):
        p = msgpack.unpackb(msg.data)
        gap = p.get("gap", 0)
        for i in range(p["n"]):
            if gap:
                await asyncio.sleep(gap)
            await nc.publish(msg.reply, msgpack.packb([i, time.perf_counter_ns()]))
        await nc.publish(msg.reply, b"")
    await nc.subscribe("bench.deltas", cb=on_req)
    await nc.flush()
    print(port, flush=True)
    await asyncio.Event().wait()

asyncio.run(main(sys.argv[1]))
"""


async def socket_stream(conn, n: int, lat: list[float], gap: float = 0) -> float:
    t0 = time.perf_counter_ns()
    first = None
    async for _i, sent in conn.call("deltas", {"n": n, "gap": gap}):
        now = time.perf_counter_ns()
        first = first or now
        lat.append((now - sent) / 1000)
    return (first - t0) / 1000


async def nats_stream(nc, n: int, lat: list[float], gap: float = 0) -> float:
    inbox = nc.new_inbox()
    queue: asyncio.Queue = asyncio.Queue()

    async def cb(msg):
        queue.put_nowait(msg.data)

    sub = await nc.subscribe(inbox, cb=cb)
    t0 = time.perf_counter_ns()
    await nc.publish("bench.deltas", msgpack.packb({"n": n, "gap": gap}), reply=inbox)
    first = None
    while True:
        data = await queue.get()
        if not data:
            break
        _i, sent = msgpack.unpackb(data)
        now = time.perf_counter_ns()
        first = first or now
        lat.append((now - sent) / 1000)
    await sub.unsubscribe()
    return (first - t0) / 1000


async def measure(name: str, one, deltas: int) -> dict:
    # Latency is measured paced (one delta per ms, as a decoding engine emits them), so it is
    # the transport's added time, not queueing behind a saturated pipe.
    lat: list[float] = []
    setups = [await one(10, []) for _ in range(50)]
    await one(2000, lat, 0.001)
    t0 = time.perf_counter()
    await one(deltas, [])
    single = deltas / (time.perf_counter() - t0)
    lat32: list[float] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(one(deltas // 8, []) for _ in range(32)))
    conc = 32 * (deltas // 8) / (time.perf_counter() - t0)
    await asyncio.gather(*(one(500, lat32, 0.001) for _ in range(32)))
    return {
        "transport": name,
        "deltas_per_s_1": single,
        "deltas_per_s_32": conc,
        "p50_us": pct(lat, 0.5),
        "p99_us": pct(lat, 0.99),
        "p50_us_32": pct(lat32, 0.5),
        "setup_p50_us": statistics.median(setups),
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--deltas", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from dynvllm.runtime import nats as natsrt
    from dynvllm.runtime.streams import Connection
    from dynvllm.settings import RuntimeSettings

    with natsrt.EmbeddedNats() as server:
        proc = subprocess.Popen([sys.executable, "-c", SERVER, server.url], stdout=subprocess.PIPE, text=True)
        try:
            port = int(proc.stdout.readline())
            conn = Connection("127.0.0.1", port)
            await conn.open()
            nc = await natsrt.connect(RuntimeSettings(nats_url=server.url))
            rows = []
            for _ in range(args.repeat):
                rows.append(
                    await measure(
                        "socket", lambda n, lat, gap=0: socket_stream(conn, n, lat, gap), args.deltas
                    )
                )
                rows.append(
                    await measure("nats", lambda n, lat, gap=0: nats_stream(nc, n, lat, gap), args.deltas)
                )
            await conn.close()
            await nc.close()
        finally:
            proc.kill()
            proc.wait()
    print(
        f"date {time.strftime('%Y-%m-%d %H:%M')} cpus {os.cpu_count()} "
        f"deltas/stream {args.deltas} repeats {args.repeat}"
    )
    keys = ["deltas_per_s_1", "deltas_per_s_32", "p50_us", "p99_us", "p50_us_32", "setup_p50_us"]
    med = {}
    for t in ("socket", "nats"):
        med[t] = {k: statistics.median(r[k] for r in rows if r["transport"] == t) for k in keys}
        spread = {
            k: (
                min(r[k] for r in rows if r["transport"] == t),
                max(r[k] for r in rows if r["transport"] == t),
            )
            for k in keys
        }
        print(
            f"{t:7s} "
            + "  ".join(f"{k}={med[t][k]:,.0f} [{spread[k][0]:,.0f}-{spread[k][1]:,.0f}]" for k in keys)
        )
    print("ratio socket/nats  " + "  ".join(f"{k}={med['socket'][k] / med['nats'][k]:.2f}" for k in keys))


if __name__ == "__main__":
    asyncio.run(main())
