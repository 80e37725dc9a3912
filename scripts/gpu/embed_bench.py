#!/usr/bin/env python3
"""embed_bench.py URL MODEL TOKENIZER LABEL OUTDIR [N TOKENS C] -- /v1/embeddings on one server.

  1. probe: 4 fixed texts, one request each, one at a time; vectors to OUTDIR/embed_vec_LABEL.json
  2. load: N inputs (default 512) of ~TOKENS tokens (200), one input a request, C in flight (16):
     embeddings/s, latency p50/p99, prompt tokens; one JSON line to OUTDIR/embed_bench.jsonl
embed_bench.py compare A.json B.json -- max abs difference per probe vector, and prompt tokens.
The texts are the same for every server (seeded words cut to TOKENS tokens by the tokenizer)."""

import asyncio
import json
import random
import statistics
import sys
import time

import aiohttp

WORDS = ["the", "river", "runs", "past", "old", "mountain", "road", "and", "red", "dog", "sees", "sky"]


def texts(tokenizer: str, n: int, tokens: int, seed: int) -> list[str]:
    from transformers import AutoTokenizer

    tok, rng, out = AutoTokenizer.from_pretrained(tokenizer), random.Random(seed), []
    for _ in range(n):
        ids = tok(" ".join(rng.choice(WORDS) for _ in range(tokens * 2)), add_special_tokens=False)[
            "input_ids"
        ]
        out.append(tok.decode(ids[:tokens]))
    return out


async def one(s: aiohttp.ClientSession, url: str, model: str, text: str) -> dict:
    async with s.post(url + "/v1/embeddings", json={"model": model, "input": text}) as r:
        body = await r.json(content_type=None)
        if r.status != 200:
            raise RuntimeError(f"{r.status}: {str(body)[:300]}")
        return body


async def run(
    url: str, model: str, tokenizer: str, label: str, outdir: str, n: int, tokens: int, c: int
) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        probe = []
        for t in texts(tokenizer, 3, 60, 7) + ["hello"]:
            b = await one(s, url, model, t)
            probe.append({"vector": b["data"][0]["embedding"], "prompt_tokens": b["usage"]["prompt_tokens"]})
        json.dump(probe, open(f"{outdir}/embed_vec_{label}.json", "w"))
        work = texts(tokenizer, n + c, tokens, 1)
        for t in work[:c]:  # warm-up, not counted
            await one(s, url, model, t)
        todo, lat, errors, ptok = list(reversed(work[c:])), [], [], 0

        async def worker() -> None:
            nonlocal ptok
            while todo:
                t, t0 = todo.pop(), time.perf_counter()
                try:
                    b = await one(s, url, model, t)  # awaited before the sum reads ptok
                    ptok += b["usage"]["prompt_tokens"]
                    lat.append(time.perf_counter() - t0)
                except Exception as exc:
                    errors.append(str(exc)[:200])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        secs = time.perf_counter() - t0
    lat.sort()
    q = {"lat_p50_ms": statistics.median(lat), "lat_p99_ms": lat[int(0.99 * (len(lat) - 1))]} if lat else {}
    row = dict(label=label, requests=n, concurrency=c, ok=len(lat), errors=len(errors), secs=round(secs, 3))
    row |= {"emb_per_s": round(len(lat) / secs, 2), "prompt_tokens_mean": round(ptok / max(len(lat), 1), 1)}
    row |= {k: round(v * 1e3, 2) for k, v in q.items()} | {
        "dim": len(probe[0]["vector"]),
        "error": errors[:1],
    }
    print(json.dumps(row))
    open(f"{outdir}/embed_bench.jsonl", "a").write(json.dumps(row) + "\n")


def compare(a: str, b: str) -> None:
    pa, pb = json.load(open(a)), json.load(open(b))
    diffs = [
        max(abs(x - y) for x, y in zip(u["vector"], v["vector"], strict=True))
        for u, v in zip(pa, pb, strict=True)
    ]
    toks = [(u["prompt_tokens"], v["prompt_tokens"]) for u, v in zip(pa, pb, strict=True)]
    out = {"compare": [a, b], "max_abs_diff": max(diffs), "per_probe": diffs, "prompt_tokens": toks}
    print(json.dumps(out | {"within_1e-3": max(diffs) < 1e-3}))


if __name__ == "__main__":
    if sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        u, m, tk, lb, od = sys.argv[1:6]
        n, tokens, c = ([int(x) for x in sys.argv[6:9]] + [512, 200, 16][len(sys.argv[6:9]) :])[:3]
        asyncio.run(run(u, m, tk, lb, od, n, tokens, c))
