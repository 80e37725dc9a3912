#!/usr/bin/env python
"""What sharing routing decisions costs in CPU, away from HTTP and engines: one process routes
RATE requests/s (choose, started, finished 50 ms later) through a `RouterPeers`; a second applies
them as a peer frontend. Reported: CPU us per request of each, against the same router with
sharing off, for several batch intervals (`min_interval`; 0 = a batch every event-loop turn); the
receiver's less what it costs with a peer that routes nothing; and the batches per request.

    .venv/bin/python scripts/bench_decision_wire.py [--rate 1000] [--intervals 0,0.002,0.005]
    git archive HEAD dynvllm | tar -x -C /tmp/head     # the last commit's code beside (`base`)
    .venv/bin/python scripts/bench_decision_wire.py --intervals 0.002 --baseline /tmp/head
"""

from __future__ import annotations

import argparse
import asyncio
import os
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


async def role(name: str, url: str, interval: float, rate: float, seconds: float, grows: int = 0) -> None:
    from dynvllm.frontend.peers import RouterPeers
    from dynvllm.frontend.routing import Router
    from dynvllm.runtime import nats as natsrt
    from dynvllm.settings import RouterSettings, RuntimeSettings

    rt = RuntimeSettings(nats_url=url, namespace="wire")
    nc = await natsrt.connect(rt)
    router = Router(RouterSettings(router="kv"))
    peers = RouterPeers(nc, rt, router, min_interval=interval)
    await peers.start(share=name != "off")
    batches = 0
    if router.peers is not None:  # count the batches applied
        apply = router.peers.apply

        def counted(batch, now):
            nonlocal batches
            batches += 1
            apply(batch, now)

        router.peers.apply = counted  # type: ignore[method-assign]
    rng = random.Random(0)
    workers = [f"{i:012x}" for i in range(4)]
    prompts = [[rng.randrange(500) for _ in range(128)] for _ in range(1000)]
    await asyncio.sleep(1.0)  # both sides up
    c0, t0, n = cpu(), time.perf_counter(), 0
    batches = 0
    if name == "recv":
        await asyncio.sleep(seconds + 0.3)
    else:
        loop = asyncio.get_running_loop()
        due = 0.0
        while time.perf_counter() - t0 < seconds:
            due += rate / 1000
            while due >= 1:  # arrivals each ms
                due -= 1
                p = prompts[n % len(prompts)]
                n += 1
                pick = router.choose(workers, p, 32)
                t = router.started(pick.worker, 4.0, pick.rank, pick.keys)
                for g in range(grows):  # output blocks, spread over its 50 ms
                    loop.call_later(0.05 * (g + 1) / (grows + 1), router.grow, pick.worker, pick.rank, 1, t)
                loop.call_later(0.05, router.finished, pick.worker, 4.0, pick.rank, pick.keys, grows, t)
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.3)
    print(f"requests {n} cpu {cpu() - c0:.4f} batches {batches}", flush=True)
    await peers.stop()
    await natsrt.close(nc)


def run(py: str, args: list[str], source: str | None = None) -> subprocess.Popen:
    """`source`: a source tree whose dynvllm package runs instead of the installed one."""
    env = dict(os.environ, PYTHONPATH=source) if source else None
    return subprocess.Popen([py, __file__, "--role", *args], stdout=subprocess.PIPE, text=True, env=env)


def parse(out: str) -> tuple[int, float, int]:
    m = re.search(r"requests (\d+) cpu ([\d.]+) batches (\d+)", out)
    assert m, out
    return int(m.group(1)), float(m.group(2)), int(m.group(3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--intervals", default="0,0.002,0.005")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--interval-idle", type=float, default=0.002, help=argparse.SUPPRESS)
    ap.add_argument("--baseline", help="a source tree (e.g. an export of the last commit) run beside")
    ap.add_argument("--grows", type=int, default=0, help="output blocks of each request")
    ap.add_argument("--role", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        name, url, interval, rate, seconds, grows = args.role
        import uvloop

        uvloop.run(role(name, url, float(interval), float(rate), float(seconds), int(grows)))
        return
    from dynvllm.runtime.nats import EmbeddedNats

    rows: dict[str, list[tuple[float, float]]] = defaultdict(list)
    common = [str(args.rate), str(args.seconds), str(args.grows)]
    with EmbeddedNats() as server:
        trees = [("", None), ("base ", args.baseline)] if args.baseline else [("", None)]
        for r in range(args.rounds):
            n, c, _ = parse(run(sys.executable, ["off", server.url, "0", *common]).communicate()[0])
            rows["off"].append((c / n * 1e6, 0.0, 0.0))
            # A receiver's CPU with a peer that routes nothing (heartbeats, the client's own
            # timers): taken off the receivers' below, or at low rates it is most of their cost.
            idle = [str(args.interval_idle), "0", str(args.seconds), "0"]
            recv = run(sys.executable, ["recv", server.url, *idle])
            run(sys.executable, ["send", server.url, *idle]).communicate()
            idle_cpu = parse(recv.communicate()[0])[1]
            for interval in args.intervals.split(","):
                for label, source in trees if r % 2 == 0 else trees[::-1]:  # ABAB, BABA
                    recv = run(sys.executable, ["recv", server.url, interval, *common], source)
                    send = run(sys.executable, ["send", server.url, interval, *common], source)
                    n, c, _ = parse(send.communicate()[0])
                    _, rc, got = parse(recv.communicate()[0])
                    rows[label + interval].append((c / n * 1e6, (rc - idle_cpu) / n * 1e6, got / n))
                    print(
                        f"round {r + 1} {label}{interval}: "
                        + "  ".join(f"{v:.2f}" for v in rows[label + interval][-1])
                    )
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M')}, {args.rate:.0f} requests/s of {args.grows} output blocks, "
        f"medians of {args.rounds}"
    )
    print("batches at most every   sender us/req   receiver us/req (less idle)   added in all   batches/req")
    base = statistics.median(v[0] for v in rows["off"])
    for key, vals in rows.items():
        s, r = statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals)
        got = statistics.median(v[2] for v in vals)
        tree, _, interval = key.rpartition(" ")
        label = "each loop turn" if interval != "off" and float(interval) == 0 else f"{interval} s"
        label = "sharing off" if key == "off" else f"{tree} {label}".strip()
        print(f"{label:22s}  {s:12.0f}   {r:26.0f}   {s - base + r:10.0f}   {got:11.2f}")


if __name__ == "__main__":
    main()
