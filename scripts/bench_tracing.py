#!/usr/bin/env python
"""Cost of tracing at the frontend and workers (sim engine), side by side in one run.

Two services run at once on simulated workers: "off" (no --otlp-traces-endpoint) and "on"
(every request traced: frontend spans and a worker span per request, exported over OTLP/HTTP to a
local receiver process that answers each batch with 200). Rounds alternate off/on; each is a closed
loop of `--concurrency` streams sending streaming completions for `--seconds`
(`--new-connections`: a new connection per request). Printed per round: requests/s, errors, TTFT
p50; then the on/off ratio of the medians. Each client request carries a sampled W3C
traceparent, so every request is traced; with `--sample R` requests carry none and the "on"
service samples a share R of them (OTEL_TRACES_SAMPLER=parentbased_traceidratio).

    .venv/bin/python scripts/bench_tracing.py --concurrency 32 --new-connections
    .venv/bin/python scripts/bench_tracing.py --concurrency 32 --new-connections --sample 0.05

`--baseline-tree DIR` adds a third service, "base": tracing on as "on", but running the code of
another source tree (e.g. `git archive HEAD | tar -x -C DIR`), so that a change is measured
against the code before it in the same run.
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


def start(args, name: str, model: str, port: int, otlp: str | None, folder: Path) -> subprocess.Popen:
    cmd = sim_serve(args, model, port, f"bench-tracing-{name}-{os.getpid()}")
    env = dict(os.environ)
    if name == "base":
        tree = str(Path(args.baseline_tree).resolve())
        env["PYTHONPATH"] = os.pathsep.join([tree, str(Path(tree) / "plugins"), env.get("PYTHONPATH", "")])
    if otlp:
        traced(cmd, env, otlp, args.sample)
    log = open(folder / f"{name}.log", "w")
    # `python -m` puts the working folder first on the path: the baseline runs from its tree.
    cwd = args.baseline_tree if name == "base" else None
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=cwd
    )


async def load(base: str, args) -> dict:
    import aiohttp

    url = base + "/v1/completions"
    limit = 0 if args.new_connections else args.concurrency + 8
    connector = aiohttp.TCPConnector(limit=limit, force_close=args.new_connections)
    body = {"model": "m", "prompt": "hello " * 32, "max_tokens": args.max_tokens, "stream": True}
    stats: dict = {"ok": 0, "errors": 0, "ttft": []}
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=600)
    ) as session:
        start = time.perf_counter()
        end = start + args.seconds

        async def stream() -> None:
            while time.perf_counter() < end:
                headers = {} if args.sample is not None else {"traceparent": traceparent()}
                t0 = time.perf_counter()
                ttft = 0.0
                try:
                    async with session.post(url, json=body, headers=headers) as r:
                        if r.status != 200:
                            await r.read()
                            stats["errors"] += 1
                            continue
                        async for line in r.content:
                            if not ttft and line.startswith(b"data: {"):
                                ttft = time.perf_counter() - t0
                    stats["ok"] += 1
                    stats["ttft"].append(ttft)
                except Exception:
                    stats["errors"] += 1

        await asyncio.gather(*(stream() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - start
    ttfts = sorted(stats.pop("ttft"))
    stats["rps"] = stats["ok"] / elapsed
    stats["ttft_p50_ms"] = ttfts[len(ttfts) // 2] * 1000 if ttfts else float("nan")
    return stats


async def together(ports: dict[str, int], args) -> dict[str, dict]:
    """Every load at once: what slows the machine (other work on it) slows all alike, and the
    service that costs more CPU per request serves fewer in the same time."""
    names = list(ports)
    stats = await asyncio.gather(*(load(f"http://127.0.0.1:{ports[n]}", args) for n in names))
    return dict(zip(names, stats, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    sim_load_options(ap, rounds=4)
    ap.add_argument("--sample", type=float, help="share of requests traced (default: every one)")
    ap.add_argument("--baseline-tree", help="a source tree to run a third service from, traced as 'on'")
    ap.add_argument("--keep-logs", action="store_true", help="keep the services' logs (and the model built)")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    model = model_or_tiny(args.model, folder)
    otlp, receiver = otlp_receiver()
    ports = {"off": free_port(), "on": free_port()}
    if args.baseline_tree:
        ports["base"] = free_port()
    procs = {n: start(args, n, model, ports[n], otlp if n != "off" else None, folder) for n in ports}
    try:
        for name, proc in procs.items():
            wait_ready(ports[name], proc)
        for name in ports:  # warm-up, not counted
            asyncio.run(
                load(f"http://127.0.0.1:{ports[name]}", argparse.Namespace(**{**vars(args), "seconds": 3.0}))
            )
        rows: dict[str, list[dict]] = {n: [] for n in ports}
        for k in range(args.rounds):
            order = list(ports) if k % 2 == 0 else list(reversed(ports))
            load_before = os.getloadavg()[0]
            cpu0 = {n: cpu_seconds(procs[n]) for n in ports}
            both = asyncio.run(together(ports, args)) if args.together else {}
            cpu1 = {n: cpu_seconds(procs[n]) for n in ports}
            for name in order:
                s = both.get(name) or asyncio.run(load(f"http://127.0.0.1:{ports[name]}", args))
                rows[name].append(s)
                print(
                    f"round {k + 1} {name:3}: {s['rps']:7.1f} req/s, {s['ok']} ok, {s['errors']} errors, "
                    f"TTFT p50 {s['ttft_p50_ms']:.1f} ms",
                    flush=True,
                )
                if both:  # CPU per answered request, by process kind (both loads ran together)
                    per = {
                        kind: (cpu1[name][kind] - cpu0[name].get(kind, 0.0)) / max(1, s["ok"])
                        for kind in cpu1[name]
                    }
                    print(
                        "    CPU ms/request: "
                        + ", ".join(f"{kind} {1000 * v:.2f}" for kind, v in per.items())
                    )
            ratios = ", ".join(
                f"{n}/off {rows[n][-1]['rps'] / rows['off'][-1]['rps']:.3f}" for n in ports if n != "off"
            )
            print(
                f"round {k + 1}: {ratios}; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}",
                flush=True,
            )
        med = {n: statistics.median(r["rps"] for r in rows[n]) for n in ports}
        for n in ports:
            if n == "off":
                continue
            per_round = [a["rps"] / b["rps"] for a, b in zip(rows[n], rows["off"], strict=True)]
            print(
                f"c={args.concurrency} new_connections={args.new_connections} sample={args.sample} "
                f"together={args.together}: {n}/off per round "
                f"{', '.join(f'{x:.3f}' for x in per_round)} (median {statistics.median(per_round):.3f}); "
                f"median req/s off {med['off']:.1f}, {n} {med[n]:.1f}, ratio {med[n] / med['off']:.3f}; "
                f"errors off {sum(r['errors'] for r in rows['off'])}, {n} {sum(r['errors'] for r in rows[n])}"
            )
    finally:
        for proc in procs.values():
            stop(proc)
        receiver.kill()
        receiver.wait()
        if args.keep_logs:
            print(f"service logs: {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
