#!/usr/bin/env python
"""Cost of tenants, quotas and the admission queue at the frontend (sim engine), side by side.

Two services run at once on simulated workers: "off" (no tenants file, no queue) and "on" (a
tenants file, each tenant with a request rate, a token rate and a concurrency limit that the load
stays within, plus one flooder over its limits; the admission queue on, holding what the workers
cannot take). Rounds alternate off/on; each round is a closed loop of `--concurrency` streams,
each sending streaming completions one after the other for `--seconds` (`--new-connections`: a
new connection per request; `--together`: both loaded at once). Printed per round: the load
average, requests/s, errors other than the flooder's 429s, TTFT p50, CPU per answered request by
process kind; then the on/off ratios per round and of the medians.

    .venv/bin/python scripts/bench_tenancy.py --concurrency 32 --new-connections
    .venv/bin/python scripts/bench_tenancy.py --concurrency 2000
    .venv/bin/python scripts/bench_tenancy.py --concurrency 5000 --http-workers 2

The "on" service's queue holds requests by the workers' load reports (`--admission-max-waiting 0`:
no engine queues any), or with `--saturation inflight` by its own in-flight count.

`--on tenants,queue,tracing` (or `--on all`) also traces at "on": spans exported over OTLP/HTTP to a
local receiver process; every request traced (each client request, at both services, carries a
sampled W3C traceparent), or with `--sample R` a share R sampled by the service (parent-based):

    .venv/bin/python scripts/bench_tenancy.py --concurrency 32 --new-connections --together --on all
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from benchkit import (
    cpu_seconds,
    free_port,
    model_or_tiny,
    otlp_receiver,
    sim_load_options,
    sim_serve,
    stop,
    traced,
    traceparent,
    wait_ready,
)

TENANTS = 8


def tenants_file(folder: Path) -> Path:
    """Tenants the load stays within (rates far above what it reaches, concurrency above its share),
    and a flooder whose every request beyond two a second is refused."""
    lines = ["tenants:"]
    for i in range(TENANTS):
        lines += [
            f"  t{i}:",
            f"    keys: [key-{i}]",
            "    requests_per_second: 100000",
            "    tokens_per_minute: 1000000000",
            "    max_concurrent: 100000",
            "    models: [m]",
        ]
    lines += ["  flood:", "    keys: [key-flood]", "    requests_per_second: 2", "    max_concurrent: 4"]
    path = folder / "tenants.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start(args, model: str, port: int, on: bool, folder: Path, otlp: str | None) -> subprocess.Popen:
    cmd = sim_serve(args, model, port, f"bench-tenancy-{'on' if on else 'off'}-{os.getpid()}")
    env = dict(os.environ)
    if on and otlp:
        traced(cmd, env, otlp, args.sample)
    cmd += ["--sim-max-num-seqs", str(args.max_num_seqs), "--http-workers", str(args.http_workers)]
    if on and "tenants" in args.on:
        cmd += ["--tenants-file", str(tenants_file(folder))]
    if on and "queue" in args.on:
        if args.saturation == "reports":  # the workers' load reports: no engine queues requests
            cmd += ["--admission-max-waiting", "0"]
        else:  # the frontend's own count: the engines' batch per worker
            cmd += ["--max-inflight-per-worker", str(args.max_num_seqs)]
        cmd += ["--admission-queue-size", str(args.concurrency * 2)]
        cmd += ["--admission-timeout", str(args.admission_timeout)]
    log = open(folder / f"{'on' if on else 'off'}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


async def load(base: str, args, on: bool) -> dict:
    """A closed loop of `concurrency` streams for `seconds`, and the flooder beside them (at both
    services, so that both serve the same requests; only "on" refuses its excess)."""
    import aiohttp

    url = base + "/v1/completions"
    limit = 0 if args.new_connections else args.concurrency + 8
    connector = aiohttp.TCPConnector(limit=limit, force_close=args.new_connections)
    timeout = aiohttp.ClientTimeout(total=600)
    stats = {"ok": 0, "in_window": 0, "errors": 0, "flood_ok": 0, "flood_429": 0, "ttft": []}
    kinds: dict[int, int] = {}  # error status (0: no answer) -> count
    body = {"model": "m", "prompt": "hello " * 32, "max_tokens": args.max_tokens, "stream": True}

    # Both services get the same requests: a traceparent asks "on" to trace, "off" ignores it.
    trace = "tracing" in args.on and args.sample is None

    async def request(session, key: str | None) -> tuple[int, float]:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        if trace:
            headers["traceparent"] = traceparent()
        t0 = time.perf_counter()
        ttft = 0.0
        async with session.post(url, json=body, headers=headers) as r:
            if r.status != 200:
                await r.read()
                return r.status, 0.0
            async for line in r.content:
                if not ttft and line.startswith(b"data: {"):
                    ttft = time.perf_counter() - t0
        return 200, ttft

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        end = time.perf_counter() + args.seconds
        start = time.perf_counter()

        async def stream(i: int) -> None:
            key = f"key-{i % TENANTS}" if on and "tenants" in args.on else None
            while time.perf_counter() < end:
                try:
                    status, ttft = await request(session, key)
                except Exception:
                    status, ttft = 0, 0.0
                if status == 200:
                    stats["ok"] += 1
                    stats["ttft"].append(ttft)
                    if time.perf_counter() <= end:
                        stats["in_window"] += 1
                else:
                    stats["errors"] += 1
                    kinds[status] = kinds.get(status, 0) + 1

        async def flooder() -> None:
            # The same traffic at both services: without tenants it is simply served.
            key = "key-flood" if on and "tenants" in args.on else None
            while time.perf_counter() < end:
                try:
                    status, _ = await request(session, key)
                except Exception:
                    status = 0
                if status == 200:
                    stats["flood_ok"] += 1
                elif status == 429:
                    stats["flood_429"] += 1
                else:
                    stats["errors"] += 1
                await asyncio.sleep(0.05)  # 20/s: ten times its 2/s

        tasks = [asyncio.create_task(stream(i)) for i in range(args.concurrency)]
        if "tenants" in args.on:
            tasks.append(asyncio.create_task(flooder()))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    ttfts = sorted(stats.pop("ttft"))
    stats["kinds"] = kinds
    # Requests answered within the window, over the window: requests still running at its end
    # (long ones, with thousands of streams) are waited for and checked, not counted.
    stats["rps"] = stats["in_window"] / args.seconds
    stats["elapsed"] = elapsed
    stats["ttft_p50_ms"] = ttfts[len(ttfts) // 2] * 1000 if ttfts else float("nan")
    return stats


async def together(ports: dict[str, int], args) -> dict[str, dict]:
    """Both loads at once: what slows the machine (other work on it) slows both alike, and the
    service that costs more CPU per request serves fewer in the same time."""
    off, on = await asyncio.gather(
        load(f"http://127.0.0.1:{ports['off']}", args, False),
        load(f"http://127.0.0.1:{ports['on']}", args, True),
    )
    return {"off": off, "on": on}


def _spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {kind: after[kind] - before.get(kind, 0.0) for kind in after}


def main() -> None:
    ap = argparse.ArgumentParser()
    sim_load_options(ap, rounds=3)
    ap.add_argument("--http-workers", type=int, default=1)
    ap.add_argument("--max-num-seqs", type=int, default=1024)
    ap.add_argument("--keep-logs", action="store_true", help="keep the services' logs (and the model built)")
    ap.add_argument(
        "--on",
        default="tenants,queue",
        help="what the 'on' service turns on: tenants, queue, tracing (or all)",
    )
    ap.add_argument(
        "--sample", type=float, help="with tracing: share of requests traced (default: every one)"
    )
    ap.add_argument(
        "--saturation",
        choices=["reports", "inflight"],
        default="reports",
        help="what holds requests in the queue: the workers' load reports (--admission-max-waiting 0) "
        "or the frontend's in-flight count (--max-inflight-per-worker = --max-num-seqs)",
    )
    ap.add_argument("--admission-timeout", type=float, default=30.0)
    args = ap.parse_args()
    if args.on == "all":
        args.on = "tenants,queue,tracing"
    folder = Path(tempfile.mkdtemp(prefix="bench-tenancy-"))
    model = model_or_tiny(args.model, folder)
    otlp, receiver = otlp_receiver() if "tracing" in args.on else (None, None)
    ports = {"off": free_port(), "on": free_port()}
    procs = {name: start(args, model, ports[name], name == "on", folder, otlp) for name in ports}
    try:
        for name, proc in procs.items():
            wait_ready(ports[name], proc)
        for name in ports:  # warm-up, not counted (first connections, tokenizer caches)
            warm = argparse.Namespace(**{**vars(args), "seconds": 3.0})
            asyncio.run(load(f"http://127.0.0.1:{ports[name]}", warm, name == "on"))
        rows: dict[str, list[dict]] = {"off": [], "on": []}
        for k in range(args.rounds):
            order = ["off", "on"] if k % 2 == 0 else ["on", "off"]
            load_before = os.getloadavg()[0]
            cpu: dict[str, dict[str, float]] = {}
            if args.together:
                cpu0 = {n: cpu_seconds(procs[n]) for n in ports}
                both = asyncio.run(together(ports, args))
                cpu = {n: _spent(cpu0[n], cpu_seconds(procs[n])) for n in ports}
                for name in order:
                    rows[name].append(both[name])
            else:
                for name in order:
                    before = cpu_seconds(procs[name])
                    rows[name].append(
                        asyncio.run(load(f"http://127.0.0.1:{ports[name]}", args, name == "on"))
                    )
                    cpu[name] = _spent(before, cpu_seconds(procs[name]))
            print(
                f"round {k + 1}: load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}, "
                f"on/off {rows['on'][-1]['rps'] / rows['off'][-1]['rps']:.3f}",
                flush=True,
            )
            for name in order:
                s = rows[name][-1]
                print(
                    f"round {k + 1} {name:3}: {s['rps']:7.1f} req/s, {s['ok']} ok, {s['errors']} errors "
                    f"{s['kinds'] or ''}, "
                    f"flooder {s['flood_ok']} ok / {s['flood_429']} 429, TTFT p50 {s['ttft_p50_ms']:.1f} ms",
                    flush=True,
                )
                # CPU per answered request by process kind ("other": NATS), flooder's included.
                answered = max(1, s["ok"] + s["flood_ok"])
                print(
                    "    CPU ms/request: "
                    + ", ".join(f"{kind} {1000 * v / answered:.2f}" for kind, v in sorted(cpu[name].items()))
                )
        ratios = [a["rps"] / b["rps"] for a, b in zip(rows["on"], rows["off"], strict=True)]
        print(
            f"on ({args.on}) / off per round: {', '.join(f'{x:.3f}' for x in ratios)}; "
            f"median {statistics.median(ratios):.3f}"
        )
        off = statistics.median(r["rps"] for r in rows["off"])
        on = statistics.median(r["rps"] for r in rows["on"])
        print(
            f"c={args.concurrency} new_connections={args.new_connections} http_workers={args.http_workers} "
            f"together={args.together}: "
            f"median req/s off {off:.1f}, on {on:.1f}, on/off {on / off:.3f}; "
            f"errors off {sum(r['errors'] for r in rows['off'])}, on {sum(r['errors'] for r in rows['on'])}"
        )
    finally:
        for proc in procs.values():
            stop(proc)
        if receiver is not None:
            receiver.kill()
            receiver.wait()
        if args.keep_logs:
            print(f"service logs: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
