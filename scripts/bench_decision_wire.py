#!/usr/bin/env python
"""What sharing routing decisions costs in CPU, away from HTTP and engines: one process routes
RATE requests/s (choose, started, finished 50 ms later) through a `RouterPeers`; a second applies
them as a peer frontend. Reported: CPU us per request of each, against the same router with
sharing off, for several batch intervals (`min_interval`; 0 = a batch every event-loop turn).

    .venv/bin/python scripts/bench_decision_wire.py [--rate 1000] [--intervals 0,0.002,0.005]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def role(name: str, url: str, interval: float, rate: float, seconds: float) -> None:
    from dynvllm.frontend.peers import RouterPeers
    from dynvllm.frontend.routing import Router
    from dynvllm.runtime import nats as natsrt
    from dynvllm.settings import RouterSettings, RuntimeSettings

    rt = RuntimeSettings(nats_url=url, namespace="wire")
    nc = await natsrt.connect(rt)
    router = Router(RouterSettings(router="kv"))
    peers = RouterPeers(nc, rt, router, min_interval=interval)
    await peers.start(share=name != "off")
    rng = random.Random(0)
    workers = [f"{i:012x}" for i in range(4)]
    prompts = [[rng.randrange(500) for _ in range(128)] for _ in range(1000)]
    await asyncio.sleep(1.0)  # both sides up
    c0, t0, n = cpu(), time.perf_counter(), 0
    if name == "recv":
        await asyncio.sleep(seconds + 0.3)
    else:
        loop = asyncio.get_running_loop()
        while time.perf_counter() - t0 < seconds:
            for _ in range(max(1, int(rate / 1000))):  # arrivals each ms
                p = prompts[n % len(prompts)]
                n += 1
                pick = router.choose(workers, p, 32)
                t = router.started(pick.worker, 4.0, pick.rank, pick.keys)
                loop.call_later(0.05, router.finished, pick.worker, 4.0, pick.rank, pick.keys, 0, t)
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.3)
    print(f"requests {n} cpu {cpu() - c0:.4f}", flush=True)
    await peers.stop()
    await natsrt.close(nc)


def run(py: str, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([py, __file__, "--role", *args], stdout=subprocess.PIPE, text=True)


def parse(out: str) -> tuple[int, float]:
    m = re.search(r"requests (\d+) cpu ([\d.]+)", out)
    assert m, out
    return int(m.group(1)), float(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--intervals", default="0,0.002,0.005")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--role", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        name, url, interval, rate, seconds = args.role
        import uvloop

        uvloop.run(role(name, url, float(interval), float(rate), float(seconds)))
        return
    from dynvllm.runtime.nats import EmbeddedNats

    rows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    common = [str(args.rate), str(args.seconds)]
    with EmbeddedNats() as server:
        for _ in range(args.rounds):
            n, c = parse(run(sys.executable, ["off", server.url, "0", *common]).communicate()[0])
            rows["off"].append((c / n * 1e6, 0.0))
            for interval in args.intervals.split(","):
                recv = run(sys.executable, ["recv", server.url, interval, *common])
                send = run(sys.executable, ["send", server.url, interval, *common])
                n, c = parse(send.communicate()[0])
                _, r = parse(recv.communicate()[0])
                rows[interval].append((c / n * 1e6, r / n * 1e6))
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {args.rate:.0f} requests/s, medians of {args.rounds}")
    print("batches at most every   sender us/req   receiver us/req   added in all")
    base = statistics.median(s for s, _ in rows["off"])
    for key, vals in rows.items():
        s, r = statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals)
        label = "sharing off" if key == "off" else ("each loop turn" if float(key) == 0 else f"{key} s")
        print(f"{label:22s}  {s:12.0f}   {r:14.0f}   {s - base + r:10.0f}")


if __name__ == "__main__":
    main()
