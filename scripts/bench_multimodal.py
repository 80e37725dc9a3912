#!/usr/bin/env python
"""Images through agg alone vs agg + an encode worker, on the same cores, side by side.

Builds the tiny BLIP-2 (`dynvllm model tiny --vision`), starts `serve agg` and then `serve agg
--roles agg=1,encode=1`, and for each sends --images distinct images (concurrency --concurrency,
one output token, so the time is the image and the prompt) and then the same images again
(the embedding-cache hit). Prints images/s and TTFT p50 for first sight and repeat, per setup,
alternating for --rounds rounds.
Run: .venv/bin/python scripts/bench_multimodal.py
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import free_port, stop, wait_ready

TEMPLATE = "Question: <prompt> Answer:"


def png(seed: int) -> str:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (56, 56, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def burst(url: str, images: list[str], concurrency: int) -> tuple[float, list[float]]:
    sem = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []

    async def one(client: httpx.AsyncClient, image: str) -> None:
        body = {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image}},
                        {"type": "text", "text": "what"},
                    ],
                }
            ],
            "max_tokens": 1,
        }
        async with sem:
            t = time.perf_counter()
            r = await client.post(url + "/v1/chat/completions", json=body)
            r.raise_for_status()
            ttfts.append((time.perf_counter() - t) * 1000)

    async with httpx.AsyncClient(timeout=300) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, im) for im in images))
        return len(images) / (time.perf_counter() - t0), ttfts


def run(setup: str, model: Path, images: list[str], concurrency: int, log) -> dict:
    port = free_port()
    roles = ["--roles", "agg=1,encode=1"] if setup == "encode" else []
    flags = f"serve agg --served-model-name m --http-host 127.0.0.1 --http-port {port} --enforce-eager "
    flags += f"--kv-cache-memory-bytes {256 << 20} --block-size 32 --max-model-len 512 --max-num-seqs 16 "
    flags += f"--namespace bench-mm-{setup}"
    args = [sys.executable, "-m", "dynvllm", *flags.split(), "--model", str(model)]
    args += ["--mm-prompt-template", TEMPLATE, *roles]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(port, proc, 600)
        url = f"http://127.0.0.1:{port}"
        asyncio.run(burst(url, [png(10_000 + i) for i in range(4)], 2))  # warm-up
        first_rate, first = asyncio.run(burst(url, images, concurrency))
        again_rate, again = asyncio.run(burst(url, images, concurrency))
        return {
            "first_rate": first_rate,
            "first_p50": statistics.median(first),
            "again_rate": again_rate,
            "again_p50": statistics.median(again),
        }
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from dynvllm.models.tiny_vision import build_tiny_vision_model

    work = Path(tempfile.mkdtemp(prefix="bench-mm-"))
    model = build_tiny_vision_model(work / "model")
    results: dict[str, list[dict]] = {"agg": [], "encode": []}
    with open(work / "serve.log", "ab") as log:
        for r in range(args.rounds):
            images = [png(r * 1000 + i) for i in range(args.images)]
            for setup in ("agg", "encode"):
                res = run(setup, model, images, args.concurrency, log)
                results[setup].append(res)
                print(
                    f"[{setup} r{r + 1}] first sight {res['first_rate']:.1f} images/s, TTFT p50 "
                    f"{res['first_p50']:.0f} ms; repeat {res['again_rate']:.1f} images/s, "
                    f"TTFT p50 {res['again_p50']:.0f} ms",
                    flush=True,
                )
    med = {s: {k: statistics.median(x[k] for x in v) for k in v[0]} for s, v in results.items()}
    print(
        f"\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cpus, {args.images} images, "
        f"c={args.concurrency}: "
        f"encode/agg images/s first {med['encode']['first_rate'] / med['agg']['first_rate']:.2f}x, "
        f"repeat {med['encode']['again_rate'] / med['agg']['again_rate']:.2f}x; TTFT p50 encode first "
        f"{med['encode']['first_p50']:.0f} ms, repeat {med['encode']['again_p50']:.0f} ms "
        f"(agg {med['agg']['first_p50']:.0f} / {med['agg']['again_p50']:.0f} ms)"
    )


if __name__ == "__main__":
    main()
