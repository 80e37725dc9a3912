#!/usr/bin/env python
"""Embedding throughput of `dynvllm serve embed` against vLLM's own server's `/v1/embeddings`,
on the same model, engine arguments and inputs.

The two servers run one at a time (vLLM's CPU engine busy-waits: an idle one beside the other
would take a core from it); each round starts one, checks its vectors on 4 probe texts, warms it
up, runs a closed loop of N requests (one input each unless --batch) at concurrency C, and stops
it; the order alternates each round. Printed per round: embeddings/s, latency p50/p99 and the
CPU seconds of the server's whole process tree per 1000 embeddings; then medians, dynvllm's
ratio to vLLM and the largest difference between the two servers' probe vectors.
Run: .venv/bin/python scripts/bench_embed.py [--model DIR] [--rounds 2] [--requests 400]
[--concurrency 16] [--tokens 64] [--batch 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import cpu_seconds, free_port, model_or_tiny, stop, wait_ready

#: The same engine arguments for both servers (the test suite's, for a tiny model on CPU).
ENGINE = ["--enforce-eager", "--kv-cache-memory-bytes", str(128 << 20), "--block-size", "32"]
WORDS = ["the", "river", "runs", "past", "old", "mountain", "road", "and", "red", "dog", "sees", "sky"]
NAME = "m"


def texts(model: str, n: int, tokens: int, seed: int) -> list[str]:
    """`n` texts of `tokens` tokens each: seeded words cut by the model's tokenizer."""
    from transformers import AutoTokenizer

    tok, rng, out = AutoTokenizer.from_pretrained(model), random.Random(seed), []
    for _ in range(n):
        ids = tok(" ".join(rng.choice(WORDS) for _ in range(tokens * 2)), add_special_tokens=False)
        out.append(tok.decode(ids["input_ids"][:tokens]))
    return out


def command(server: str, model: str, port: int) -> list[str]:
    if server == "vllm":
        return [
            sys.executable,
            *("-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", NAME),
            *("--runner", "pooling", "--convert", "embed", "--host", "127.0.0.1", "--port", str(port)),
            *("--uvicorn-log-level", "warning", "--disable-log-stats", *ENGINE),
        ]
    return [
        sys.executable,
        *("-m", "dynvllm", "serve", "embed", "--model", model, "--served-model-name", NAME),
        *("--http-host", "127.0.0.1", "--http-port", str(port), "--namespace", f"benchembed{port}", *ENGINE),
    ]


def _kind(args: list[str]) -> str:
    """Which part of a server a process is, by its command line (vLLM's processes retitle
    themselves): vLLM's engine core or model runner (its CPU worker process), dynvllm's frontend,
    worker or NATS server, else the main process (vLLM's API server, dynvllm's supervisor)."""
    cmd = " ".join(args)
    if "EngineCore" in cmd:
        return "engine-core"
    if "VLLM::Worker" in cmd:
        return "model-runner"
    for kind in ("frontend", "worker", "nats-server"):
        if kind in cmd:
            return kind.removesuffix("-server")
    return "main"


async def load(url: str, inputs: list, c: int, proc: subprocess.Popen) -> dict:
    """One closed loop at concurrency `c` over `inputs` (each one request's input)."""
    import aiohttp

    lat: list[float] = []
    todo = list(reversed(inputs))
    count = 0

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=c * 2), timeout=aiohttp.ClientTimeout(total=300)
    ) as s:

        async def client() -> None:
            nonlocal count
            while todo:
                one, t0 = todo.pop(), time.perf_counter()
                async with s.post(url + "/v1/embeddings", json={"model": NAME, "input": one}) as r:
                    body = await r.json(content_type=None)
                    assert r.status == 200, body
                lat.append(time.perf_counter() - t0)
                count += len(body["data"])

        cpu0, t0 = cpu_seconds(proc, _kind), time.perf_counter()
        await asyncio.gather(*(client() for _ in range(c)))
        secs, cpu1 = time.perf_counter() - t0, cpu_seconds(proc, _kind)
    lat.sort()
    parts = {k: (v - cpu0.get(k, 0.0)) * 1000 / count for k, v in sorted(cpu1.items())}
    return {
        "cpu_parts": parts,
        "emb_s": count / secs,
        "p50_ms": statistics.median(lat) * 1e3,
        "p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3,
        "cpu_per_1k": sum(parts.values()),
    }


async def probe(url: str, inputs: list[str]) -> list[list[float]]:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        out = []
        for text in inputs:
            async with s.post(url + "/v1/embeddings", json={"model": NAME, "input": text}) as r:
                out.append((await r.json())["data"][0]["embedding"])
        return out


def one_round(
    server: str, model: str, work: Path, args, inputs: list, probes: list[str]
) -> tuple[dict, list]:
    port = free_port()
    log = work / f"{server}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    if server == "dynvllm":
        env["DYN_STATE_DIR"] = str(work / "state")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            command(server, model, port),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        t0 = time.monotonic()
        wait_ready(port, proc, timeout=900, path="/v1/models", ready=lambda b: NAME.encode() in b)
        started = time.monotonic() - t0
        url = f"http://127.0.0.1:{port}"
        vectors = asyncio.run(probe(url, probes))
        asyncio.run(load(url, inputs[: args.concurrency * 2], args.concurrency, proc))
        row = asyncio.run(load(url, inputs, args.concurrency, proc))
        row["start_s"] = started
        return row, vectors
    except BaseException:
        print(f"see {log}:\n{log.read_text()[-2000:]}", file=sys.stderr)
        raise
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="an embedding-capable model folder (default: a tiny one built here)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per input")
    ap.add_argument("--batch", type=int, default=1, help="inputs per request")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    try:
        compare(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compare(args: argparse.Namespace, work: Path) -> None:
    """The rounds, then the summary (the model, logs and state live in `work`)."""
    model = model_or_tiny(args.model, work)
    flat = texts(model, args.requests * args.batch, args.tokens, 1)
    inputs: list = (
        flat if args.batch == 1 else [flat[i : i + args.batch] for i in range(0, len(flat), args.batch)]
    )
    probes = [*texts(model, 3, 40, 7), "hello"]
    rows: dict[str, list[dict]] = {"dynvllm": [], "vllm": []}
    vectors: dict[str, list] = {}
    for k in range(args.rounds):
        for server in ("dynvllm", "vllm") if k % 2 == 0 else ("vllm", "dynvllm"):
            row, vectors[server] = one_round(server, model, work, args, inputs, probes)
            rows[server].append(row)
            print(
                f"round {k + 1} {server:8s} {row['emb_s']:8.1f} emb/s  p50 {row['p50_ms']:7.1f} ms  "
                f"p99 {row['p99_ms']:7.1f} ms  {row['cpu_per_1k']:6.2f} CPU s/1k emb  (ready in "
                f"{row['start_s']:.0f} s); CPU s/1k by process: "
                + ", ".join(f"{k} {v:.2f}" for k, v in row["cpu_parts"].items()),
                flush=True,
            )
    print(
        f"\n{args.requests} requests x {args.batch} input(s) of {args.tokens} tokens, c={args.concurrency}, "
        f"{args.rounds} rounds, load average {os.getloadavg()[0]:.1f} at the end"
    )
    print(f"{'server':8s} {'emb/s':>8s} {'(spread)':>13s} {'p50 ms':>7s} {'p99 ms':>7s} {'CPU s/1k':>8s}")
    med = {
        s: {k: statistics.median(r[k] for r in rs) for k in ("emb_s", "p50_ms", "p99_ms", "cpu_per_1k")}
        for s, rs in rows.items()
    }
    for s, rs in rows.items():
        spread = f"{min(r['emb_s'] for r in rs):.0f}-{max(r['emb_s'] for r in rs):.0f}"
        m = med[s]
        lat = f"{m['p50_ms']:7.1f} {m['p99_ms']:7.1f}"
        print(f"{s:8s} {m['emb_s']:8.1f} {spread:>13s} {lat} {m['cpu_per_1k']:8.2f}")
    paired = [d["emb_s"] / v["emb_s"] for d, v in zip(rows["dynvllm"], rows["vllm"], strict=True)]
    ratio = {k: med["dynvllm"][k] / med["vllm"][k] for k in ("emb_s", "p50_ms", "cpu_per_1k")}
    print(
        f"dynvllm / vLLM: emb/s {ratio['emb_s']:.2f} (per round {', '.join(f'{p:.2f}' for p in paired)}), "
        f"p50 {ratio['p50_ms']:.2f}, CPU/emb {ratio['cpu_per_1k']:.2f}"
    )
    diff = max(
        abs(a - b)
        for u, v in zip(vectors["dynvllm"], vectors["vllm"], strict=True)
        for a, b in zip(u, v, strict=True)
    )
    print(f"probe vectors: largest difference {diff:.2e}")


if __name__ == "__main__":
    main()
