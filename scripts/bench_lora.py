#!/usr/bin/env python
"""LoRA adapters: load time from a local folder, and what routing among many adapters costs.

Starts `dynvllm serve agg --workers 2 --enable-lora --max-loras K` on the tiny model, loads K
distinct adapters on each worker with `dynvllm lora load --worker` (timed by the worker), then runs the same
streaming load against the base model and spread over the 2 x K adapters, alternately for
`--rounds` rounds. Prints load times and TTFT p50/p99 per case and their ratio.
Run: .venv/bin/python scripts/bench_lora.py [--adapters-per-worker 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import loadgen
from bench_serve import ENGINE, WORDS, free_port, stop, wait_ready
from benchkit import serve_agg


def post(url: str, body: dict, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters-per-worker", type=int, default=4)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    k = args.adapters_per_worker
    with tempfile.TemporaryDirectory() as tmp:
        from dynvllm.models.tiny import build_tiny_lora, build_tiny_model

        model = Path(tmp) / "tiny"
        build_tiny_model(model, seed=0)
        root = Path(tmp) / "adapters"
        build_tiny_lora(model, root / "a0", seed=0)
        names = [f"a{i}" for i in range(2 * k)]
        for n in names[1:]:
            shutil.copytree(root / "a0", root / n)
        port = free_port()
        log = open(Path(tmp) / "serve.log", "wb")
        env = {**os.environ, "DYN_LORA_ROOTS": str(root), "DYN_NAMESPACE": f"benchlora{port}"}
        cmd = [
            *serve_agg(model),
            "--workers",
            "2",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(port),
            *ENGINE,
            "--enable-lora",
            "--max-loras",
            str(k),
            "--max-lora-rank",
            "8",
        ]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_ready(port, proc)
            url = f"http://127.0.0.1:{port}"
            while json.load(urllib.request.urlopen(url + "/health"))["workers"] < 2:
                time.sleep(0.3)
            status = subprocess.run(
                [sys.executable, "-m", "dynvllm", "status", "--json"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            workers = sorted(
                i["id"] for i in json.loads(status.stdout)["instances"] if i["component"] == "worker"
            )
            load_ms = []
            for i, n in enumerate(names):  # k distinct adapters per worker fill each one's max_loras
                out = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "dynvllm",
                        "lora",
                        "load",
                        n,
                        "--source",
                        str(root / n),
                        "--worker",
                        workers[i % 2],
                        "--json",
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                result = json.loads(out.stdout)[0]["result"] if out.returncode == 0 else out.stderr
                if not isinstance(result, dict):
                    raise RuntimeError(f"loading {n} failed: {result}")
                load_ms.append(result["seconds"] * 1000)  # measured by the worker: resolve + vLLM add_lora
            rng = random.Random(0)

            def bodies(models: list[str]) -> list[dict]:
                return [
                    {
                        "model": rng.choice(models),
                        "prompt": " ".join(rng.choice(WORDS) for _ in range(64)),
                        "max_tokens": 16,
                        "stream_options": {"include_usage": True},
                        "temperature": 0,
                        "stream": True,
                    }
                    for _ in range(args.requests)
                ]

            served = [m["id"] for m in json.load(urllib.request.urlopen(url + "/v1/models"))["data"]]
            adapters = [n for n in names if n in served]
            cases = (("base", ["m"]), ("one adapter", adapters[:1]), ("all adapters", adapters))
            table: dict[str, list[dict]] = {case: [] for case, _ in cases}
            for _, models in cases:  # warm-up: first use of each adapter and of the base
                asyncio.run(loadgen.run(url, bodies(models)[:16], args.concurrency))
            for _ in range(args.rounds):
                for case, models in cases:
                    res, elapsed = asyncio.run(loadgen.run(url, bodies(models), args.concurrency))
                    table[case].append(loadgen.summary(res, elapsed))
        finally:
            stop(proc)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cpus, tiny model, 2 workers, max_loras {k}")
    print(
        f"adapters served: {len(adapters)}; load time on the worker (local folder) "
        f"p50 {statistics.median(load_ms):.1f} ms, max {max(load_ms):.1f} ms"
    )
    print("case           ok    TTFT p50 ms   TTFT p99 ms   tok/s")
    med = {}
    for case, rows in table.items():
        med[case] = {
            key: statistics.median(r[key] for r in rows)
            for key in ("ok", "ttft_p50_ms", "ttft_p99_ms", "tok_s")
        }
        m = med[case]
        print(
            f"{case:13s} {m['ok']:4.0f}   {m['ttft_p50_ms']:10.1f}   {m['ttft_p99_ms']:10.1f}   "
            f"{m['tok_s']:7.1f}"
        )
    one, spread, base = med["one adapter"], med["all adapters"], med["base"]
    print(
        f"one adapter / base: TTFT p50 {one['ttft_p50_ms'] / base['ttft_p50_ms']:.2f}x, "
        f"tok/s {one['tok_s'] / base['tok_s']:.2f}x (vLLM's LoRA compute); "
        f"all / one adapter: TTFT p50 {spread['ttft_p50_ms'] / one['ttft_p50_ms']:.2f}x, "
        f"tok/s {spread['tok_s'] / one['tok_s']:.2f}x (spreading over {len(adapters)} adapters)"
    )


if __name__ == "__main__":
    main()
