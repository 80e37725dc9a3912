#!/usr/bin/env python
"""KV routing under cache pressure on SIMULATED engines: the sim's prediction of what
scripts/gpu/pressure.sh measures on a GPU.

`dynvllm serve agg --engine sim --workers 4` behind the kv router with its defaults, plus a
`dynvllm frontend` joining its private NATS for each other policy named (rr: round-robin; kv4: kv
with weight 4 and no decode weight; kv1: kv with weight 1 and no decode weight, the defaults before
2026-12-06; alt: kv with the flags of --alt), all seeing the same four engines.
scripts/gpu/pressure_probe.py's multi-turn trace runs against each policy for --rounds rounds,
each run with prompts of its own (SALT) after `dynvllm kv clear`.
--ceiling first runs one engine with four times the blocks (the cached-share ceiling). Prints the
probe lines, the TTFT ratios (rr/kv, rr/kv4), each policy's cached share as a share of the
ceiling, and the CPU the services used (this host's cores are shared with the engines' timers).

    .venv/bin/python scripts/bench_pressure_sim.py --rounds 2 --ceiling

The default timings are an H200's for a Qwen3-4B shape, fitted to the eleventh GPU round's req/s
(docs/benchmarks.md): the whole device's cost per uncached prompt token and per engine step,
with the engines taking turns on it (--shared-device).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from benchkit import cpu_by_process, model_or_tiny, serve_agg, stop_all, wait_ready

from dynvllm.runtime.state import resolve_nats_url

HERE = Path(__file__).resolve().parent
PROBE = HERE / "gpu" / "pressure_probe.py"
POLICIES = {"kv": 0, "rr": 1, "kv4": 2, "alt": 4, "kv1": 5}  # port offset from --port (the ceiling +3)
FRONTENDS = {
    "rr": ["--router", "round-robin"],
    "kv4": ["--router", "kv", "--router-prefill-weight", "4", "--router-decode-weight", "0"],
    "kv1": ["--router", "kv", "--router-prefill-weight", "1", "--router-decode-weight", "0"],
}


def options() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prefill-us-per-token", type=float, default=13.3, help="sim cost per uncached token")
    ap.add_argument("--decode-ms-per-step", type=float, default=4.4, help="sim cost of every engine step")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="sim running-batch limit (sim default 64)")
    ap.add_argument("--kv-blocks", type=int, default=3000, help="KV blocks per engine (16 tokens each)")
    ap.add_argument("--words", type=int, default=885, help="a system prompt's (885: 2,161 tokens a request)")
    ap.add_argument("--systems", type=int, default=64)
    ap.add_argument("--users", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--osl", type=int, default=32, help="output tokens a request")
    ap.add_argument("--ceiling", action="store_true", help="also run one engine with 4x the blocks")
    ap.add_argument(
        "--shared-device",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one --sim-device for the four engines: their steps take turns, as on the one GPU they share",
    )
    ap.add_argument("--sim-args", default="", help="more engine flags, e.g. '--sim-async-scheduling 0'")
    ap.add_argument("--policies", default="kv,rr,kv4")
    ap.add_argument(
        "--alt",
        default="--router kv --router-decode-weight 0",
        help="routing flags of the frontend that policy alt names (started only when named; "
        "default: weight 8 with no decode weight)",
    )
    ap.add_argument(
        "--http-workers",
        default="1",
        help="each frontend's processes (a GPU host's 16 cores give `auto` 4: its routers share "
        "decisions through NATS, and their lag spreads a hot prompt more than one process does)",
    )
    ap.add_argument("--model", help="a model folder (tokenizer, config); default: a tiny one built here")
    ap.add_argument(
        "--port", type=int, default=9400, help="kv frontend; rr +1, kv4 +2, ceiling +3, alt +4, kv1 +5"
    )
    ap.add_argument("--out", default=None, help="JSON lines of the runs (default: in a temporary folder)")
    return ap.parse_args()


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.nats: dict[str, str] = {}  # namespace -> its `serve agg`'s private NATS
        self.out = Path(args.out or tmp / "pressure.jsonl")
        self.procs: list[subprocess.Popen] = []
        self.salt = int(time.time()) % 100_000 * 100  # fresh prompts in every run, across invocations
        self.results: list[dict] = []
        self.client: subprocess.Popen | None = None

    def spawn(self, cmd: list[str], log: str) -> subprocess.Popen:
        with open(self.tmp / log, "ab") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def serve(self, ns: str, port: int, workers: int, blocks: int) -> subprocess.Popen:
        a = self.args
        sim = [
            *("--block-size", "16", "--sim-kv-blocks", str(blocks)),
            *("--sim-prefill-us-per-token", str(a.prefill_us_per_token)),
            *("--sim-decode-ms-per-step", str(a.decode_ms_per_step)),
        ]
        if a.max_num_seqs:
            sim += ["--sim-max-num-seqs", str(a.max_num_seqs)]
        if a.shared_device:
            sim += ["--sim-device", f"bench-pressure-{os.getpid()}-{ns}"]
        sim += shlex.split(a.sim_args)
        cmd = [
            *serve_agg(self.model),
            *("--engine", "sim", "--workers", str(workers), "--router", "kv", "--max-model-len", "8192"),
            *f"--namespace {ns} --http-host 127.0.0.1 --http-port {port}".split(),
            *("--http-workers", a.http_workers),
            *sim,
        ]
        return self.spawn(cmd, f"serve_{ns}.log")

    def frontend(self, ns: str, port: int, extra: list[str]) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "dynvllm", "frontend", "--nats-url", self.nats[ns], "--namespace", ns]
        cmd += ["--http-host", "127.0.0.1", "--http-port", str(port)]
        cmd += ["--http-workers", self.args.http_workers, *extra]
        return self.spawn(cmd, f"frontend_{port}.log")

    @staticmethod
    def ready(port: int, proc: subprocess.Popen, workers: int) -> None:
        wait_ready(port, proc, 300, ready=lambda body: json.loads(body).get("workers") == workers)

    def cpu(self) -> dict[int, tuple[str, float]]:
        """CPU seconds so far of every process started here (and their children), by pid."""
        seen: dict[int, tuple[str, float]] = {}
        for p in self.procs:
            try:
                tree = cpu_by_process(p)
            except psutil.Error:
                continue
            for pid, (argv, seconds) in tree.items():
                kind = next((k for k in ("worker", "frontend", "serve") if k in argv), "other")
                kind = "nats" if argv[0].endswith("nats-server") else "reaper" if "-c" in argv else kind
                seen[pid] = (kind, seconds)
        return seen

    def probe(self, ns: str, port: int, label: str) -> None:
        a = self.args
        self.salt += 1
        subprocess.run(
            [sys.executable, "-m", "dynvllm", "kv", "clear", "--nats-url", self.nats[ns], "--namespace", ns],
            capture_output=True,
            timeout=60,
        )
        before, t0 = self.cpu(), time.monotonic()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        trace = [str(a.systems), str(a.users), str(a.words), str(a.concurrency)]
        self.client = subprocess.Popen(
            [sys.executable, str(PROBE), f"http://127.0.0.1:{port}", label, str(self.out), *trace],
            env={**os.environ, "SALT": str(self.salt), "OSL": str(a.osl)},
            start_new_session=True,
        )
        self.client.wait()
        wall, after = time.monotonic() - t0, self.cpu()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        client_cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
        use: dict[str, list[float]] = {}
        for pid, (kind, sec) in after.items():
            use.setdefault(kind, []).append((sec - before.get(pid, (kind, 0.0))[1]) / wall)
        parts = ", ".join(f"{k} {sum(v):.0%} (max one {max(v):.0%})" for k, v in sorted(use.items()))
        print(f"    cpu over {wall:.0f} s: {parts}, client {client_cpu / wall:.0%}", flush=True)
        lines = [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]
        hit = [r for r in lines if r.get("label") == label]
        if hit:
            self.results.append({**hit[-1], "wall_s": wall})

    def run(self) -> None:
        a = self.args
        self.model = model_or_tiny(a.model, self.tmp)
        if a.ceiling:
            t0 = time.monotonic()
            s = self.serve("ceiling", a.port + 3, 1, 4 * a.kv_blocks)
            self.ready(a.port + 3, s, 1)
            self.nats["ceiling"] = resolve_nats_url(None, "ceiling")
            print(f"[ceiling] ready after {time.monotonic() - t0:.0f} s", flush=True)
            for r in range(1, a.rounds + 1):
                self.probe("ceiling", a.port + 3, f"ceiling-{r}")
            self.procs.remove(s)
            stop_all([s])
        t0 = time.monotonic()
        s = self.serve("four", a.port, 4, a.kv_blocks)
        self.ready(a.port, s, 4)
        self.nats["four"] = resolve_nats_url(None, "four")
        policies = a.policies.split(",")
        named = [p for p in dict.fromkeys(policies) if p != "kv"]
        flags = {**FRONTENDS, "alt": shlex.split(a.alt)}
        fes = {p: self.frontend("four", a.port + POLICIES[p], flags[p]) for p in named}
        for p, proc in fes.items():
            self.ready(a.port + POLICIES[p], proc, 4)
        print(f"[four] ready after {time.monotonic() - t0:.0f} s", flush=True)
        for r in range(1, a.rounds + 1):
            for pol in policies:
                self.probe("four", a.port + POLICIES[pol], f"four-{pol}-{r}")

    def report(self) -> None:
        by = {r["label"]: r for r in self.results}
        ceil = [r["cached_share"] for k, r in by.items() if k.startswith("ceiling")]
        top = sum(ceil) / len(ceil) if ceil else None
        a = self.args
        print(
            f"\nsim: {a.prefill_us_per_token} us/token, {a.decode_ms_per_step} ms/step, "
            f"{a.kv_blocks} blocks x 16, {a.words} words, shared device {a.shared_device}, "
            f"{a.sim_args or 'no other flags'}; {os.cpu_count()} cpus"
        )
        print(
            "label           req/s  TTFT p50  TTFT p90  latency p50"
            "  cached  of ceiling  prompt tok/req  wall s"
        )
        for k, r in by.items():
            of = f"{r['cached_share'] / top:9.1%}" if top else "        -"
            print(
                f"{k:14s} {r['req_s']:6.1f} {r['ttft_p50_ms']:9.1f} {r['ttft_p90_ms']:9.1f} "
                f"{r['latency_p50_ms']:12.1f} "
                f"{r['cached_share']:7.1%}  {of}  {r['prompt_tokens'] / r['requests']:14.0f} "
                f"{r['wall_s']:7.1f}"
            )
        for r in range(1, a.rounds + 1):
            p50 = {p: by.get(f"four-{p}-{r}", {}).get("ttft_p50_ms") for p in POLICIES}
            if p50["rr"] and p50["kv"] and p50["kv4"]:
                print(
                    f"round {r}: TTFT p50 rr/kv {p50['rr'] / p50['kv']:.2f}x, "
                    f"rr/kv4 {p50['rr'] / p50['kv4']:.2f}x"
                )


def main() -> None:
    args = options()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds into the cleanup below
    d = tempfile.mkdtemp(prefix="bench_pressure_")
    bench = Bench(args, Path(d))
    t0 = time.monotonic()
    try:
        bench.run()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        stop_all([p for p in (bench.client, *bench.procs) if p is not None])
        for lock in Path(tempfile.gettempdir()).glob(f"dynvllm-sim-device-bench-pressure-{os.getpid()}-*"):
            lock.unlink()
        bench.report()
        print(f"total {time.monotonic() - t0:.0f} s; logs and {bench.out.name} in {d}")


if __name__ == "__main__":
    main()
