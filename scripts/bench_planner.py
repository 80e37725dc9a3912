#!/usr/bin/env python
"""The planner against static provisioning on one recorded trace, side by side in one run.

Sim engine workers (`--engine sim`, a batch of 8, 100 ms per decode step, OSL 8: about 9 req/s
per worker at the targets) behind `dynvllm serve agg`. The trace is a list of arrival times
(ramp up 10x, plateau, ramp down, idle, burst, idle) drawn once from a seeded Poisson process and
kept in --trace (replayed as is when the file exists). Runs, each on a fresh service:

  static     --workers MAX for the whole trace (provisioned for the peak)
  planner/S  --workers 1 and `dynvllm planner --min-workers 0 --max-workers MAX`, every sim
             engine taking S trace seconds to start (--sim-start-s), for each S in --start

Time is compressed --scale times: the trace's phases, the engine start-up, the planner's
interval, cool-down and idle time are divided by it; request latencies and the targets are not
(the rates a phase asks for are the same, it lasts shorter). Times are printed in trace seconds.
Each request streams; TTFT is measured at the client from the moment it is sent, so time spent
waiting in the frontend's queue (for a worker to start) counts. A request meets the SLA when its
TTFT <= --ttft-target and its mean inter-token gap <= --itl-target; failed = not a 200 with OSL
tokens. Worker-seconds count worker processes from their start to their exit (starting and
draining ones included), polled from the supervisor's control endpoint. Both are printed for
the whole trace and per phase, with the burst's TTFT and the attainment outside the burst (a
burst after an idle period at zero workers pays a cold start that no policy can hide). Run:
  .venv/bin/python scripts/bench_planner.py [--scale 5] [--start 0,60,120] [--min-workers 0,1]
      [--rounds 3]
With --rounds N every run is repeated N times, interleaved (static, planner runs, static, ...),
and each round's table compares its planner runs with that round's static run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import loadgen

SIM = ["--engine", "sim", "--sim-decode-ms-per-step", "100", "--sim-max-num-seqs", "8"]
ISL, OSL, VOCAB = 64, 8, 500
# (name, trace seconds, rate at start, rate at end) in req/s: the peak is 10x the base.
PHASES = [
    ("base", 60, 2.4, 2.4),
    ("ramp up", 120, 2.4, 24.0),
    ("plateau", 150, 24.0, 24.0),
    ("ramp down", 120, 24.0, 2.4),
    ("idle", 420, 0.0, 0.0),
    ("burst", 60, 24.0, 24.0),
    ("idle tail", 90, 0.0, 0.0),
]


def make_trace(scale: float, seed: int = 27) -> list[float]:
    """Arrival times (wall seconds) of a Poisson process whose rate follows PHASES (thinning),
    each phase `scale` times shorter at the same rate."""
    rng = random.Random(seed)
    out, t0 = [], 0.0
    top = max(max(a, b) for _, _, a, b in PHASES)
    for _, whole, a, b in PHASES:
        length, t = whole / scale, 0.0
        while True:
            t += rng.expovariate(top)
            if t >= length:
                break
            if rng.random() < (a + (b - a) * t / length) / top:
                out.append(round(t0 + t, 4))
        t0 += length
    return out


def phase_of(t: float) -> str:
    """The phase of trace second t."""
    t0 = 0.0
    for name, length, _, _ in PHASES:
        if t < t0 + length:
            return name
        t0 += length
    return PHASES[-1][0]


def dynvllm(args: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dynvllm", *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


async def wait_health(url: str, want: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"serve exited ({proc.returncode})"
            try:
                if (await http.get(url + "/health")).json().get("workers", 0) >= want:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.3)
    raise RuntimeError(f"{url}: {want} workers did not come up")


async def poll_fleet(ns: str, url: str, stop_at: asyncio.Event, samples: list) -> None:
    """(wall time, worker processes, registered workers) every 0.25 s."""
    import httpx
    import msgpack
    import nats

    from dynvllm.runtime import state
    from dynvllm.supervisor_control import subject

    nc = await nats.connect(state.resolve_nats_url(None, ns))
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            while not stop_at.is_set():
                try:
                    msg = await nc.request(subject(ns), msgpack.packb({"op": "workers"}), 5)
                    answer = msgpack.unpackb(msg.data, raw=False)
                    procs = sum(len(v) for v in answer["workers"].values()) + len(answer["draining"])
                    registered = (await http.get(url + "/health")).json().get("workers", 0)
                    samples.append((time.perf_counter(), procs, registered))
                except Exception as exc:  # one lost sample; the integral uses the neighbours
                    print(f"poll: {type(exc).__name__}", file=sys.stderr)
                await asyncio.sleep(0.25)
    finally:
        await nc.close()


async def replay(url: str, arrivals: list[float], scale: float, ns: str) -> tuple[list, list, float]:
    import aiohttp

    rng = random.Random(1)
    bodies = [
        {
            "model": "m",
            "prompt": [rng.randrange(3, VOCAB) for _ in range(ISL)],
            "max_tokens": OSL,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for _ in arrivals
    ]
    samples: list = []
    done = asyncio.Event()
    poller = asyncio.create_task(poll_fleet(ns, url, done, samples))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as s:
        start = time.perf_counter()

        async def one(i: int) -> loadgen.Result:
            await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
            return await loadgen.one(s, url + "/v1/completions", bodies[i])

        end = start + sum(p[1] for p in PHASES) / scale
        results = await asyncio.gather(*(one(i) for i in range(len(arrivals))))
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
    done.set()
    await poller
    return list(results), [(t - start, p, r) for t, p, r in samples if t <= end], end - start


def integral(samples: list, k: int, until: float, since: float = 0.0) -> float:
    """Step integral of column k over [since, until] (wall seconds)."""
    total, prev_t, prev_v = 0.0, since, samples[0][k] if samples else 0
    for row in samples:
        t = max(since, min(until, row[0]))
        total += prev_v * (t - prev_t)
        prev_t = t
        if row[0] <= until:
            prev_v = row[k]
    return total + prev_v * max(0.0, until - prev_t)


def phase_windows(scale: float) -> list[tuple[str, float, float]]:
    """(name, start, end) of each phase in wall seconds."""
    out, t0 = [], 0.0
    for name, length, _, _ in PHASES:
        out.append((name, t0 / scale, (t0 + length) / scale))
        t0 += length
    return out


def start_lags(samples: list) -> list[float]:
    """Wall seconds from a new worker process to its registration."""
    lags = []
    for i, (t, procs, _) in enumerate(samples):
        if i and procs > samples[i - 1][1]:
            later = [u for u, _, reg in samples[i:] if reg >= procs]
            if later:
                lags.append(later[0] - t)
    return lags


def summarize(name: str, results: list, samples: list, wall: float, arrivals: list, args) -> dict:
    ok = [r.ok and r.tokens == OSL for r in results]
    met = [
        good and r.ttft <= args.ttft_target and (not r.itls or sum(r.itls) / len(r.itls) <= args.itl_target)
        for r, good in zip(results, ok, strict=True)
    ]
    by_phase: dict[str, list[int]] = {}
    for t, m in zip(arrivals, met, strict=True):
        counts = by_phase.setdefault(phase_of(t * args.scale), [0, 0])
        counts[0] += m
        counts[1] += 1
    ttfts = [r.ttft for r, good in zip(results, ok, strict=True) if good]
    ws = integral(samples, 1, wall) * args.scale
    phase_ws = {
        name: round(integral(samples, 1, min(b, wall), a) * args.scale)
        for name, a, b in phase_windows(args.scale)
    }
    burst = by_phase.get("burst", [0, 0])
    return {
        "run": name,
        "requests": len(results),
        "failed": ok.count(False),
        "attainment": sum(met) / len(met),
        "worker_s": ws,
        "goodput_per_worker_s": sum(met) / ws if ws else 0.0,
        "ttft_p50": loadgen.pct(ttfts, 0.5),
        "ttft_p99": loadgen.pct(ttfts, 0.99),
        "ttft_max": max(ttfts, default=float("nan")),
        "max_workers_seen": max((p for _, p, _ in samples), default=0),
        "start_lag_s": [round(x * args.scale) for x in start_lags(samples)],
        "fleet": [  # (trace s, worker processes) where the count changed
            (round(t * args.scale), p)
            for i, (t, p, _) in enumerate(samples)
            if i == 0 or p != samples[i - 1][1]
        ],
        "by_phase": {k: f"{v[0]}/{v[1]}" for k, v in by_phase.items()},
        "worker_s_by_phase": phase_ws,
        "attainment_outside_burst": (sum(met) - burst[0]) / max(1, len(met) - burst[1]),
        "burst_ttft_p50_p99_max": [
            round(loadgen.pct(bt, q), 2) if bt else None
            for bt in [
                [
                    r.ttft
                    for r, t in zip(results, arrivals, strict=True)
                    if r.ok and phase_of(t * args.scale) == "burst"
                ]
            ]
            for q in (0.5, 0.99, 1.0)
        ],
    }


async def run_one(
    model: str, name: str, start_s: float | None, min_workers: int, profile: Path, arrivals, args, log
) -> dict:
    ns = f"bp{os.getpid()}{name.replace('/', '').replace(' ', '')}"
    port = args.port
    url = f"http://127.0.0.1:{port}"
    sim = [*SIM, "--sim-start-s", str((start_s or 0) / args.scale)]
    workers = args.max_workers if start_s is None else 1
    # Requests beyond a worker's batch wait in the frontend, where any worker (a new one too)
    # takes the next, rather than in the queue of the engine they were sent to.
    admission = ["--max-inflight-per-worker", str(args.max_inflight)] if args.max_inflight else []
    serve = dynvllm(
        [
            "serve", "agg", "--model", model, "--served-model-name", "m", "--workers", str(workers),
            "--namespace", ns, "--http-host", "127.0.0.1", "--http-port", str(port),
            "--admission-timeout", "120", *sim, *admission,
        ],
        log,
    )  # fmt: skip
    planner = None
    try:
        await wait_health(url, workers, serve)
        if start_s is not None:
            s = args.scale
            planner = dynvllm(
                [
                    "planner", "--namespace", ns, "--frontend-url", url, "--planner-profile", str(profile),
                    "--ttft-target", str(args.ttft_target), "--itl-target", str(args.itl_target),
                    "--planner-interval", str(10 / s), "--cooldown", str(30 / s),
                    "--idle-after", str(args.idle_after / s),
                    "--scale-down-after", "3", "--predictor", args.predictor, "--predictor-window", "1000",
                    "--planner-lookahead", str((start_s + args.process_start) / s),
                    "--min-workers", str(min_workers), "--max-workers", str(args.max_workers),
                    "--planner-noise-band", str(args.noise_band),
                    "--scale-down-threshold", str(args.scale_down_threshold),
                    "--planner-react-interval", str(args.react_interval / s),
                    "--planner-metrics-port", "-1",
                ],
                log,
            )  # fmt: skip
            await asyncio.sleep(2)
        load_before = os.getloadavg()
        results, samples, wall = await replay(url, arrivals, args.scale, ns)
        row = summarize(name, results, samples, wall, arrivals, args)
        row["load_avg_1m_before_after"] = [round(load_before[0], 1), round(os.getloadavg()[0], 1)]
        return row
    finally:
        if planner is not None:
            stop(planner)
        stop(serve)


def profile_once(model: str, out: Path, log) -> None:
    if out.exists():
        return
    p = dynvllm(
        ["profile", "--model", model, "--served-model-name", "m", *SIM, "--isl", str(ISL), "--osl", str(OSL),
         "--concurrency", "1,2,4,8", "--requests", "24", "-o", str(out)],
        log,
    )  # fmt: skip
    assert p.wait(300) == 0, "dynvllm profile failed (see the log)"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so that the services of a run are stopped on a SIGTERM too


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=5.0, help="time compression of the trace")
    ap.add_argument(
        "--process-start",
        type=float,
        default=10.0,
        help="trace seconds a worker process takes to register besides its engine's start-up (Python "
        "imports, NATS, registration: 1-3 s of wall time on a quiet 2-core machine, ~8 s at a load "
        "average of 15-30, x --scale); the planner's lookahead is the engine start-up plus this",
    )
    ap.add_argument("--start", default="0,60,120", help="engine start-up times, trace seconds")
    ap.add_argument("--max-workers", type=int, default=4)
    ap.add_argument("--max-inflight", type=int, default=8, help="--max-inflight-per-worker of serve (0: off)")
    ap.add_argument(
        "--min-workers",
        default="0",
        help="the planner's, comma-separated: one planner run each (0 scales to zero when idle)",
    )
    ap.add_argument("--noise-band", type=float, default=1.0, help="the planner's --planner-noise-band")
    ap.add_argument("--scale-down-threshold", type=float, default=0.7, help="the planner's")
    ap.add_argument(
        "--rounds", type=int, default=1, help="repeat every run this many times, interleaved (ABAB)"
    )
    ap.add_argument("--idle-after", type=float, default=60.0, help="the planner's, trace seconds")
    ap.add_argument(
        "--react-interval",
        type=float,
        default=1.0,
        help="the planner's look at held requests, trace seconds (0: off)",
    )
    ap.add_argument("--ttft-target", type=float, default=1.0)
    # A decode step is 100 ms; at the client one gap in ten or so spans two steps (p90 ~ 0.2 s).
    ap.add_argument("--itl-target", type=float, default=0.25)
    ap.add_argument("--predictor", default="holt-winters", help="with a season longer than the trace")
    ap.add_argument("--trace", type=Path, default=Path("/tmp/planner_trace.json"), help="recorded arrivals")
    ap.add_argument("--profile", type=Path, default=Path("/tmp/planner_bench_profile.json"))
    ap.add_argument("--port", type=int, default=24100)
    ap.add_argument("--no-static", action="store_true")
    ap.add_argument("--model")
    args = ap.parse_args()
    model = args.model
    if not model:
        from dynvllm.models.tiny import build_tiny_model

        model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    if not args.trace.exists():
        trace = {"phases": PHASES, "scale": args.scale, "arrivals": make_trace(args.scale)}
        args.trace.write_text(json.dumps(trace))
    trace = json.loads(args.trace.read_text())
    if trace["scale"] != args.scale or trace["phases"] != [list(p) for p in PHASES]:
        sys.exit(f"{args.trace} was recorded for another --scale or other phases: choose another --trace")
    arrivals = trace["arrivals"]
    with open("/tmp/bench_planner.log", "ab") as log:
        t0 = time.monotonic()
        profile_once(model, args.profile, log)
        print(f"profile: {time.monotonic() - t0:.0f} s, {args.profile}", flush=True)
        for k in range(args.rounds):
            runs: list[tuple[str, float | None, int]] = [] if args.no_static else [("static", None, 0)]
            runs += [
                (f"planner/{s} min {m}", float(s), int(m))
                for s in args.start.split(",")
                if s
                for m in args.min_workers.split(",")
                if m
            ]
            rows = []
            for name, start_s, min_workers in runs:
                row = asyncio.run(
                    run_one(model, name, start_s, min_workers, args.profile, arrivals, args, log)
                )
                row["round"] = k + 1
                rows.append(row)
                print(json.dumps(row), flush=True)
            table(rows, arrivals, args, k + 1)


def fluid_bound(capacity: float, floor: int) -> float:
    """Trace worker-seconds of a clairvoyant planner with no start-up: ceil(rate / capacity)
    workers at every instant of PHASES' rate, at least `floor` (idle phases included)."""
    total = 0.0
    for _, length, a, b in PHASES:
        steps = 2000
        for i in range(steps):
            rate = a + (b - a) * (i + 0.5) / steps
            need = math.ceil(rate / capacity - 1e-9) if rate > 0 else 0
            total += max(floor, need) * length / steps
    return total


def table(rows: list[dict], arrivals: list, args, round_no: int) -> None:
    base = rows[0] if rows and rows[0]["run"] == "static" else None
    print(
        f"\nround {round_no}, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cpus; trace "
        f"{len(arrivals)} requests over {sum(p[1] for p in PHASES)} s (x{args.scale:g} faster); targets "
        f"TTFT {args.ttft_target} s, mean ITL {args.itl_target} s; max {args.max_workers} workers; "
        f"predictor {args.predictor}; noise band {args.noise_band:g}; scale-down threshold "
        f"{args.scale_down_threshold:g}"
    )
    print(
        "run                 attainment  failed  worker-s  goodput/worker-s  vs static: attain  ws  goodput"
        "   outside burst: attain vs static   load 1m"
    )
    for r in rows:
        rel = (
            f"{r['attainment'] / base['attainment']:.3f}  {r['worker_s'] / base['worker_s']:.2f}  "
            f"{r['goodput_per_worker_s'] / base['goodput_per_worker_s']:.2f}x"
            + f"   {r['attainment_outside_burst']:.2%} "
            + f"{r['attainment_outside_burst'] / base['attainment_outside_burst']:.3f}"
            if base
            else ""
        )
        print(
            f"{r['run']:<19} {r['attainment']:9.2%}  {r['failed']:6d}  {r['worker_s']:8.0f}  "
            f"{r['goodput_per_worker_s']:16.3f}  {rel}   {r['load_avg_1m_before_after']}"
        )
    if base:
        from dynvllm.planner.profile import load as load_profile

        cap = load_profile(args.profile).capacity("agg", ISL, OSL, args.ttft_target, args.itl_target)
        mins = [int(m) for m in args.min_workers.split(",") if m]
        bounds = ", ".join(f"min {m}: {fluid_bound(cap, m) / base['worker_s']:.3f}" for m in mins)
        print(f"fluid lower bound (ceil(rate / {cap:.2f}) workers at every instant, no start-up): {bounds}")
    print("\nper phase (trace s): requests within the SLA / requests; worker-seconds")
    names = [p[0] for p in PHASES]
    print(f"{'run':<19} " + "  ".join(f"{n:>15}" for n in names))
    for r in rows:
        cells = [f"{r['by_phase'].get(n, '-')}; {r['worker_s_by_phase'].get(n, 0)}" for n in names]
        print(f"{r['run']:<19} " + "  ".join(f"{c:>15}" for c in cells))
    print(flush=True)


if __name__ == "__main__":
    main()
