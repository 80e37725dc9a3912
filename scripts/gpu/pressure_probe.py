"""pressure_probe.py URL LABEL OUT [SYSTEMS USERS SYS_WORDS CONCURRENCY] -- a multi-turn trace
whose working set is larger than one engine's KV cache: SYSTEMS system prompts (default 64) of
~SYS_WORDS tokens (default 2000), USERS conversations on each (default 3), two turns each (the
second carries the first answer), CONCURRENCY requests in flight (default 16), $OSL output tokens
a request (default 32). Turn-one requests go in a shuffled order; a conversation's second turn
joins the queue when its first has ended.

Prints and writes (one JSON line to OUT): req/s, first-text TTFT p50/p90 per turn and overall,
request latency p50/p90 (the whole answer), the share of prompt tokens served from cache
(usage.prompt_tokens_details.cached_tokens) and where the requests went (x-dynvllm-worker); per
worker, its requests, the mean number it had in flight and the mean gap between a request's output
tokens after the first (its engine's step as that worker's clients saw it). The same trace (seeded)
for every run, so runs compare."""

import asyncio
import collections
import json
import os
import random
import sys
import time

import aiohttp
import probekit

URL, LABEL, OUT = sys.argv[1], sys.argv[2], sys.argv[3]
SYSTEMS, USERS, SYS_WORDS, CONC = (
    int(a) for a in (sys.argv[4:] + ["64", "3", "2000", "16"][len(sys.argv[4:]) :])
)
WORDS = probekit.WORDS
rng = random.Random(0)
# Each system prompt differs from its first token on, so prompts share no blocks by accident.
SALT = os.environ.get("SALT", "0")  # another salt, another set of prompts: runs share no cache
OSL = int(os.environ.get("OSL", "32"))
SYSTEM_TEXTS = [
    f"run {SALT} system {i}. " + " ".join(rng.choice(WORDS) for _ in range(SYS_WORDS)) for i in range(SYSTEMS)
]


def question(s: int, u: int, turn: int) -> str:
    r = random.Random(s * 1000 + u * 10 + turn)
    return f"user {u} turn {turn}: " + " ".join(r.choice(WORDS) for _ in range(40))


async def one(session, messages, out):
    t0 = time.perf_counter()
    r, first, text, usage = await probekit.stream_chat(session, URL, probekit.chat_body(messages, OSL))
    if r.status != 200:
        out["errors"] += 1
        return ""
    worker = r.headers.get("x-dynvllm-worker", "?")[:8]
    latency = time.perf_counter() - t0
    out["ttft"].append(first * 1000)
    out["latency"].append(latency * 1000)
    tokens = usage.get("completion_tokens", 0)
    out["busy"][worker] += latency
    if tokens > 1:
        out["gaps"][worker].append((latency - first) * 1000 / (tokens - 1))
    out["prompt"] += usage.get("prompt_tokens", 0)
    out["cached"] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    out["spread"][worker] += 1
    return text


def tally() -> dict:
    return {
        "ttft": [],
        "latency": [],
        "prompt": 0,
        "cached": 0,
        "errors": 0,
        "spread": collections.Counter(),
        "busy": collections.Counter(),  # seconds of requests in flight, by worker
        "gaps": collections.defaultdict(list),  # ms between output tokens, per request, by worker
    }


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


async def main():
    turns = {t: tally() for t in (1, 2)}
    queue: asyncio.Queue = asyncio.Queue()
    firsts = [(s, u) for s in range(SYSTEMS) for u in range(USERS)]
    random.Random(1).shuffle(firsts)
    for s, u in firsts:
        queue.put_nowait((s, u, 1, None))
    left = len(firsts) * 2

    async def runner(session):
        nonlocal left
        while left > 0:
            try:
                s, u, turn, answer = await asyncio.wait_for(queue.get(), 0.5)
            except TimeoutError:
                continue
            msgs = [
                {"role": "system", "content": SYSTEM_TEXTS[s]},
                {"role": "user", "content": question(s, u, 1)},
            ]
            if turn == 2:
                msgs += [
                    {"role": "assistant", "content": answer},
                    {"role": "user", "content": question(s, u, 2)},
                ]
            text = await one(session, msgs, turns[turn])
            left -= 1
            if turn == 1:
                queue.put_nowait((s, u, 2, text or "ok"))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        await one(session, [{"role": "user", "content": "warm up"}], tally())
        t0 = time.perf_counter()
        await asyncio.gather(*(runner(session) for _ in range(CONC)))
        wall = time.perf_counter() - t0
    allt = turns[1]["ttft"] + turns[2]["ttft"]
    latency = turns[1]["latency"] + turns[2]["latency"]
    prompt = turns[1]["prompt"] + turns[2]["prompt"]
    cached = turns[1]["cached"] + turns[2]["cached"]
    spread = turns[1]["spread"] + turns[2]["spread"]
    busy = turns[1]["busy"] + turns[2]["busy"]
    workers = {
        w: {
            "requests": n,
            "in_flight": busy[w] / wall,
            "gap_ms": sum(g) / len(g) if (g := turns[1]["gaps"][w] + turns[2]["gaps"][w]) else None,
        }
        for w, n in sorted(spread.items())
    }
    res = {
        "label": LABEL,
        "requests": len(allt),
        "errors": turns[1]["errors"] + turns[2]["errors"],
        "req_s": len(allt) / wall,
        "ttft_p50_ms": pct(allt, 0.5),
        "ttft_p90_ms": pct(allt, 0.9),
        "latency_p50_ms": pct(latency, 0.5),
        "latency_p90_ms": pct(latency, 0.9),
        "cached_share": cached / max(prompt, 1),
        "prompt_tokens": prompt,
        "turn1": {
            "ttft_p50_ms": pct(turns[1]["ttft"], 0.5),
            "cached_share": turns[1]["cached"] / max(turns[1]["prompt"], 1),
        },
        "turn2": {
            "ttft_p50_ms": pct(turns[2]["ttft"], 0.5),
            "cached_share": turns[2]["cached"] / max(turns[2]["prompt"], 1),
        },
        "spread": dict(spread),
        "workers": workers,
        "trace": {
            "systems": SYSTEMS,
            "users": USERS,
            "sys_words": SYS_WORDS,
            "concurrency": CONC,
            "osl": OSL,
        },
    }
    print(
        f"[{LABEL}] {res['requests']} req ({res['errors']} errors) {res['req_s']:.1f} req/s, first-text TTFT p50 "
        f"{res['ttft_p50_ms']:.1f} ms p90 {res['ttft_p90_ms']:.1f} ms, latency p50 {res['latency_p50_ms']:.0f} ms "
        f"p90 {res['latency_p90_ms']:.0f} ms, cached {res['cached_share']:.1%} "
        f"(turn 1 {res['turn1']['cached_share']:.1%}, turn 2 {res['turn2']['cached_share']:.1%}), spread {res['spread']}"
    )
    for w, v in workers.items():
        gap = f"{v['gap_ms']:.2f} ms" if v["gap_ms"] is not None else "-"
        print(f"    {w}: {v['requests']} req, {v['in_flight']:.1f} in flight, output token gap {gap}")
    with open(OUT, "a") as f:
        f.write(json.dumps(res) + "\n")


asyncio.run(main())
