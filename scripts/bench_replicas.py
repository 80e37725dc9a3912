#!/usr/bin/env python
"""Several frontends on one NATS: do they route the same prompt to the same worker, do they find
as many cached prompt tokens as one frontend does, and what does sharing their decisions cost?

Modes, side by side in one run (each round runs them in turn, alternating their order):
  one    one frontend (`serve agg` alone): the cache-hit reference
  off    N frontends, `--no-router-share-load`
  on     N frontends, `--router-share-load`
  base   as `on`, with the dynvllm of another source tree (`--baseline DIR`, e.g. an export of
         the last commit; its processes run there, so `python -m dynvllm` imports its package):
         the code before a change, in the same run
Each mode starts `dynvllm serve agg --engine sim --workers W` (its frontend is replica 1) and N-1
more `dynvllm frontend`s on its NATS, then:
  agreement  B background streams over the frontends (system prompt + question, a few output
             tokens); meanwhile P probes, each one new prompt over a known system prompt sent to
             every frontend at the same moment; agreed = all frontends chose the same worker
             (`x-dynvllm-worker`).
  hit rate   of the background requests: prompt tokens the workers found cached (their own
             count, `usage.prompt_tokens_details.cached_tokens`) / prompt tokens; "vs one" is
             that over the `one` mode's in the same round.
  cost       a closed loop at concurrency C over all frontends (ISL 128 / OSL 16, sim engine with
             no prefill or decode time, so the frontends are the bottleneck; with
             `--cost-decode-ms D` a step takes D ms and the engines bound the rate, as GPUs do in a
             deployment, which is how a throughput cost of shared router state is usually
             measured): req/s (not for `one`),
             requests per CPU-second of the frontends, and the decision batches they published
             per request (a listener on the namespace counts them; every other frontend receives
             each: at ~50 us a batch that is most of what sharing costs).
`--probes 0` measures the cost only. Run:
  .venv/bin/python scripts/bench_replicas.py [--frontends 8] [--rounds 2] [--modes one,off,on]
  git archive HEAD dynvllm | tar -x -C /tmp/head
  .venv/bin/python scripts/bench_replicas.py --frontends 8 --baseline /tmp/head
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import psutil
from bench_serve import free_port
from benchkit import stop_all

VOCAB = 500


def start(args: list[str], log, source: str | None = None) -> subprocess.Popen:
    """`dynvllm ARGS`; `source`: a source tree whose dynvllm package runs instead of this one
    (`python -m` puts its working directory first on the path)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dynvllm", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=source,
    )


async def wait_workers(session, url: str, want: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode})")
        try:
            async with session.get(url + "/health") as r:
                if (await r.json()).get("workers", 0) >= want:
                    return
        except Exception:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{url}: workers did not come up")


STATUS: Counter[str] = Counter()
#: Prompt tokens of the background requests, and of them those the workers found cached.
TOKENS: Counter[str] = Counter()


async def post(session, url: str, prompt: list[int], max_tokens: int, count: bool = False) -> str | None:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    try:
        async with session.post(url + "/v1/completions", json=body) as r:
            data = await r.read()
            STATUS[str(r.status)] += 1
            if r.status != 200:
                return None
            if count:
                usage = json.loads(data)["usage"]
                TOKENS["prompt"] += usage["prompt_tokens"]
                TOKENS["cached"] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            return r.headers.get("x-dynvllm-worker")
    except Exception as exc:
        STATUS[type(exc).__name__] += 1
        return None


async def agreement(session, urls: list[str], seed: int, args) -> tuple[int, int]:
    rng = random.Random(seed)
    systems = [[rng.randrange(3, VOCAB) for _ in range(args.system_tokens)] for _ in range(args.systems)]

    def prompt() -> list[int]:
        return systems[rng.randrange(len(systems))] + [rng.randrange(3, VOCAB) for _ in range(48)]

    done = asyncio.Event()

    async def background(i: int) -> None:
        url = urls[i % len(urls)]
        while not done.is_set():
            await post(session, url, prompt(), args.background_tokens, count=True)

    for s in systems:  # every system prompt cached somewhere before the probes
        await post(session, urls[0], s, 1)
    streams = [asyncio.create_task(background(i)) for i in range(args.background)]
    await asyncio.sleep(1.0)
    agreed = 0
    for _ in range(args.probes):
        p = prompt()
        workers = await asyncio.gather(*(post(session, u, p, 1) for u in urls))
        agreed += None not in workers and len(set(workers)) == 1
        await asyncio.sleep(0.05)
    if len(urls) == 1:  # the hit-rate reference: as long a run as the others', no one to agree with
        agreed = args.probes
    done.set()
    await asyncio.gather(*streams)
    return agreed, args.probes


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


async def throughput(
    session, urls: list[str], procs: dict, ns: str, args
) -> tuple[float, float, float, float]:
    """req/s, CPU ms per request of the frontends and of the NATS server, and the decision
    batches the frontends published per request (each is received by every other frontend)."""
    from dynvllm.runtime import nats as natsrt
    from dynvllm.runtime import state
    from dynvllm.settings import RuntimeSettings

    batches = 0

    async def counted(msg) -> None:
        nonlocal batches
        batches += 1

    nc = await natsrt.connect(RuntimeSettings(nats_url=state.resolve_nats_url(None, ns), namespace=ns))
    await nc.subscribe(f"{ns}.router.decisions.*", cb=counted)
    await nc.flush()
    rng = random.Random(7)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(128)] for _ in range(args.requests)]
    queue = list(enumerate(prompts))
    ok = 0

    async def client(c: int) -> None:
        nonlocal ok
        while queue:
            i, p = queue.pop()
            worker = await post(session, urls[i % len(urls)], p, 16)
            ok += worker is not None

    cpu0 = {k: cpu_seconds(v) for k, v in procs.items()}
    t0 = time.perf_counter()
    batches0 = batches
    await asyncio.gather(*(client(c) for c in range(args.concurrency)))
    rps = ok / (time.perf_counter() - t0)
    cpu = {k: (cpu_seconds(v) - cpu0[k]) * 1000 / max(1, ok) for k, v in procs.items()}
    sent = (batches - batches0) / max(1, ok)
    await natsrt.close(nc)
    return rps, cpu["frontends"], cpu["nats"], sent


@contextlib.asynccontextmanager
async def service(session, model: str, mode: str, ns: str, timing: list[str], args, log):
    """`serve agg` (replica 1) and N-1 frontends on its NATS (one for mode `one`); yields their
    URLs."""
    flag = "--no-router-share-load" if mode == "off" else "--router-share-load"
    source = args.baseline if mode == "base" else None
    port = free_port()
    sim = ["--engine", "sim", "--block-size", "32", "--sim-kv-blocks", str(args.kv_blocks), *timing]
    workers = ["--model", model, "--served-model-name", "m", "--workers", str(args.workers), *sim]
    http = ["--http-host", "127.0.0.1", "--http-port"]
    procs = [start(["serve", "agg", *workers, "--namespace", ns, *http, str(port), flag], log, source)]
    urls = [f"http://127.0.0.1:{port}"]
    try:
        await wait_workers(session, urls[0], args.workers, procs[0])
        from dynvllm.runtime import state

        nats = state.resolve_nats_url(None, ns)
        # Ports taken now, not before the workers started: a worker could have taken one since.
        for _ in range(0 if mode == "one" else args.frontends - 1):
            port = free_port()
            urls.append(f"http://127.0.0.1:{port}")
            fe = ["frontend", "--nats-url", nats, "--namespace", ns, flag]
            procs.append(start([*fe, *http, str(port)], log, source))
        for url, proc in zip(urls[1:], procs[1:], strict=True):
            await wait_workers(session, url, args.workers, proc)
        children = psutil.Process(procs[0].pid).children(recursive=True)
        roles = {
            "frontends": [c for c in children if "frontend" in c.cmdline()]
            + [psutil.Process(p.pid) for p in procs[1:]],
            "nats": [c for c in children if "nats-server" in c.name()],
        }
        yield urls, roles
    finally:
        stop_all(procs[1:])
        stop_all(procs[:1])


async def one(model: str, mode: str, seed: int, args, log) -> dict:
    import aiohttp

    ns = f"replicas{os.getpid()}x{seed}{mode}"
    connector = aiohttp.TCPConnector(limit=256)
    timeout = aiohttp.ClientTimeout(total=120)
    # Agreement on the sim engine's default timing (requests take what a small GPU model takes);
    # cost with none, so that the frontends, not the engines, bound the rate.
    timing = [
        "--sim-prefill-us-per-token",
        str(args.prefill_us),
        "--sim-decode-ms-per-step",
        str(args.decode_ms),
    ]
    free = ["--sim-prefill-us-per-token", "0", "--sim-decode-ms-per-step", str(args.cost_decode_ms)]
    load = os.getloadavg()[0]
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        agreed = probes = 0
        rps = fe_ms = nats_ms = sent = 0.0
        if args.probes:
            async with service(session, model, mode, ns + "a", timing, args, log) as (urls, _):
                agreed, probes = await agreement(session, urls, seed, args)
        if mode != "one":
            async with service(session, model, mode, ns + "t", free, args, log) as (urls, procs):
                rps, fe_ms, nats_ms, sent = await throughput(session, urls, procs, ns + "t", args)
    status, tokens = dict(STATUS), dict(TOKENS)
    STATUS.clear()
    TOKENS.clear()
    return {
        "mode": mode,
        "agreed": agreed,
        "probes": probes,
        "hit_rate": round(tokens.get("cached", 0) / max(1, tokens.get("prompt", 0)), 4),
        "prompt_tokens": tokens.get("prompt", 0),
        "req_s": round(rps, 1),
        "frontend_cpu_ms": round(fe_ms, 3),
        "nats_cpu_ms": round(nats_ms, 3),
        "batches_per_req": round(sent, 3),
        "load": round(load, 2),
        "status": status,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frontends", type=int, default=2)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--systems", type=int, default=16)
    ap.add_argument("--system-tokens", type=int, default=400, help="about 300 words")
    ap.add_argument("--background", type=int, default=8)
    ap.add_argument("--background-tokens", type=int, default=32)
    ap.add_argument("--probes", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--kv-blocks", type=int, default=2048)
    ap.add_argument("--prefill-us", type=float, default=100.0, help="sim engine, agreement phase")
    ap.add_argument("--decode-ms", type=float, default=10.0, help="sim engine, agreement phase")
    ap.add_argument("--cost-decode-ms", type=float, default=0.0, help="sim engine, cost phase")
    ap.add_argument("--model")
    ap.add_argument("--modes", default="one,off,on", help="of one, off, on, base (see above)")
    ap.add_argument("--baseline", help="a source tree whose dynvllm runs the `base` mode")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if args.baseline and "base" not in modes:
        modes.append("base")
    if "base" in modes and not args.baseline:
        ap.error("mode base needs --baseline")
    model = args.model
    if not model:
        from dynvllm.models.tiny import build_tiny_model

        model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    rows = []
    with open("/tmp/bench_replicas.log", "wb") as log:
        for r in range(args.rounds):
            # ABAB..., BABA... in the next round: no mode always runs first or last.
            for m, mode in enumerate(modes if r % 2 == 0 else modes[::-1]):
                row = asyncio.run(one(model, mode, 100 * r + m, args, log))
                row["round"] = r + 1
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cpus, {args.frontends} frontends, "
        f"sim x {args.workers}, {args.systems} system prompts of {args.system_tokens} tokens, "
        f"{args.background} background streams, {args.probes} probes; c={args.concurrency} ISL 128 / OSL 16, "
        f"decode step {args.cost_decode_ms} ms"
    )
    print(
        "per round: agreed/probes, cache-hit rate (vs one's that round), req/s, requests per CPU-second "
        "of the frontends (vs off's that round); load average at the start"
    )
    ref = {r["round"]: r["hit_rate"] for r in rows if r["mode"] == "one"}
    off = {r["round"]: r["req_s"] for r in rows if r["mode"] == "off"}
    off_cpu = {r["round"]: r["frontend_cpu_ms"] for r in rows if r["mode"] == "off"}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        total = sum(r["agreed"] for r in mine) / max(1, sum(r["probes"] for r in mine))
        cells = []
        for r in mine:
            hit = f"{r['hit_rate']:.3f}"
            if ref.get(r["round"]):
                hit += f" ({r['hit_rate'] / ref[r['round']]:.3f})"
            rps = f"{r['req_s']:.0f}" if mode != "one" else "-"
            if mode != "off" and off.get(r["round"]) and mode != "one":
                rps += f" ({r['req_s'] / off[r['round']]:.2f}x off)"
            if r.get("batches_per_req"):
                rps += f" {r['batches_per_req']:.2f} batches/req"
            if mode != "one" and r["frontend_cpu_ms"]:
                # Requests per CPU-second of the frontends: sharing's cost on cores of their own.
                rps += f" {1000 / r['frontend_cpu_ms']:.0f}/fe-cpu-s"
                if mode != "off" and off_cpu.get(r["round"]):
                    rps += f" ({off_cpu[r['round']] / r['frontend_cpu_ms']:.2f}x off)"
            cells.append(f"{r['agreed']}/{r['probes']} {hit} {rps} @{r['load']}")
        fe = statistics.median(r["frontend_cpu_ms"] for r in mine)
        print(f"{mode:4s} agreement {total:6.1%}  frontend CPU {fe:.3f} ms/req  |  " + "  |  ".join(cells))


if __name__ == "__main__":
    main()
