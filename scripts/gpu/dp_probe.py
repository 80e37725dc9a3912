"""dp_probe.py URL LABEL OUT -- shared-prefix load against a running service: 8 system prompts of
~900 tokens x 8 questions, c=16, streamed, then the same 64 again. Prints req/s, first-text TTFT
p50, where requests went (worker and rank headers), the share of prompt tokens served from cache,
and writes the greedy texts of the first 8 requests (for comparing TP=1 with TP=2) as one JSON
line to OUT."""

import asyncio
import collections
import json
import random
import sys
import time

import aiohttp
import probekit

URL, LABEL, OUT = sys.argv[1], sys.argv[2], sys.argv[3]
rng = random.Random(0)
WORDS = probekit.WORDS[:14]
SYSTEMS = [" ".join(rng.choice(WORDS) for _ in range(450)) for _ in range(8)]
QUESTIONS = [f"question {i}: " + " ".join(rng.choice(WORDS) for _ in range(30)) for i in range(8)]


TTFT: list = []


async def one(session, system, question):
    """Streamed, so time to the first text is measured; usage comes in the last chunk."""
    body = probekit.chat_body([{"role": "system", "content": system}, {"role": "user", "content": question}])
    r, first, text, usage = await probekit.stream_chat(session, URL, body)
    where = (r.headers.get("x-dynvllm-worker", "?"), r.headers.get("x-dynvllm-rank", "-"))
    TTFT.append(first * 1000)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return where, usage["prompt_tokens"], cached, text


async def wave(session, pairs):
    sem = asyncio.Semaphore(16)

    async def run(p):
        async with sem:
            return await one(session, *p)

    t0 = time.perf_counter()
    res = await asyncio.gather(*(run(p) for p in pairs))
    return res, len(pairs) / (time.perf_counter() - t0)


async def main():
    pairs = [(s, q) for s in SYSTEMS for q in QUESTIONS]
    random.Random(1).shuffle(pairs)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await one(session, "warm up", "hello")
        out = {"label": LABEL}
        for name in ("first", "again"):
            TTFT.clear()
            res, rate = await wave(session, pairs)
            ttft = sorted(TTFT)[len(TTFT) // 2]
            spread = collections.Counter(f"{w[:6]}/{r}" for (w, r), *_ in res)
            prompt = sum(p for _, p, _, _ in res)
            cached = sum(c for _, _, c, _ in res)
            print(
                f"[{LABEL}] {name}: {rate:.1f} req/s, first-text TTFT p50 {ttft:.1f} ms, "
                f"cached {cached / prompt:.1%} of prompt tokens, spread {dict(spread)}"
            )
            out[name] = {
                "req_s": rate,
                "ttft_p50_ms": ttft,
                "cached_share": cached / prompt,
                "spread": dict(spread),
            }
        texts, _ = await wave(session, pairs[:8])
        out["texts"] = [t for *_, t in texts]
    with open(OUT, "a") as f:
        f.write(json.dumps(out) + "\n")


asyncio.run(main())
