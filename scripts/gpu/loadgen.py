#!/usr/bin/env python3
"""Small closed-loop streaming load generator for OpenAI-compatible servers.

Light-weight cross-check for aiperf (one process, asyncio + aiohttp, TCP_NODELAY on).
For each concurrency level C it keeps C requests in flight until --requests requests have
completed (after --warmup requests that are not counted), and reports:
  req/s, output tok/s, TTFT / ITL / e2e percentiles, errors,
  (TTFT = first SSE event carrying a token, i.e. a choice whose delta has a "content" key,
   even if empty; ITL = (last token event - first token event) / (completion_tokens - 1);
   e2e = until the response stream is fully read, incl. finish/usage/[DONE] events;
   ttft_text_p50 = first non-empty text, for comparison with aiperf's TTFT),
  CPU% of the server processes given with --cpu-pid (100% = one core; "tree" includes
  child processes such as vLLM's EngineCore), CPU% of this client, and whole-machine CPU%.

Only talks to loopback URLs unless --allow-remote is given.

Example:
  python loadgen.py --url http://127.0.0.1:8000 --model tiny --tokenizer $PEERS/model/tiny1.0 \
      --concurrency 1,8,32 --requests 300 --input-tokens 128 --output-tokens 16 --ignore-eos \
      --extra-json '{"nvext":{"annotations":["output_replay_id:osl16"]}}' \
      --cpu-pid frontend=$(cat $PEERS/run/dyn_frontend.pid) --out results.jsonl

Needs: aiohttp; optional: tokenizers (exact prompt lengths). Runs in the aiperf venv.
"""

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import sys
import time
import urllib.parse

import aiohttp

CLK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- CPU accounting
def proc_cpu_s(pid):
    """utime+stime of one process (all its threads), seconds; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / CLK
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def descendants(pid):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        for c in kids.get(p, []):
            out.append(c)
            stack.append(c)
    return out


def machine_cpu():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v), idle


class CpuWindow:
    def __init__(self, pids):
        self.pids = pids  # {name: pid}

    def snap(self):
        s = {"t": time.monotonic(), "m": machine_cpu(), "self": resource.getrusage(resource.RUSAGE_SELF)}
        for name, pid in self.pids.items():
            tree = [pid] + descendants(pid)
            s[name] = (proc_cpu_s(pid) or 0.0, {p: proc_cpu_s(p) or 0.0 for p in tree})
        return s

    @staticmethod
    def diff(a, b, names):
        dt = b["t"] - a["t"]
        out = {}
        for n in names:
            own = b[n][0] - a[n][0]
            # tree: processes alive at the end; ones started during the window count from 0
            tree = sum(v - a[n][1].get(p, 0.0) for p, v in b[n][1].items())
            out[n] = {"cpu_pct": round(100 * own / dt, 1), "cpu_pct_tree": round(100 * tree / dt, 1)}
        ra, rb = a["self"], b["self"]
        out["client"] = {
            "cpu_pct": round(100 * ((rb.ru_utime - ra.ru_utime) + (rb.ru_stime - ra.ru_stime)) / dt, 1)
        }
        (ta, ia), (tb, ib) = a["m"], b["m"]
        busy = 1 - (ib - ia) / max(1, tb - ta)
        out["machine"] = {"busy_pct_of_all_cores": round(100 * busy, 1), "cores": os.cpu_count()}
        return out


# ---------------------------------------------------------------- server-side latencies
# Histograms whose mean over a level splits the client's TTFT: vLLM's engine metrics (measured
# inside AsyncLLM, from the request's arrival there) and dynvllm's frontend metrics. The client's
# TTFT minus the engine's is the time spent outside the engine (HTTP, tokenization, hops).
HISTOGRAMS = (
    "vllm:time_to_first_token_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "dynvllm_time_to_first_token_seconds",
    "dynvllm_inter_token_latency_seconds",
)


def parse_sums(text):
    """{histogram: [sum, count]} over all label sets of a Prometheus text page."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        for suffix, idx in (("_sum", 0), ("_count", 1)):
            base = name[: -len(suffix)]
            if name.endswith(suffix) and base in HISTOGRAMS:
                out.setdefault(base, [0.0, 0.0])[idx] += float(line.rsplit(" ", 1)[1])
    return out


async def scrape_all(session, specs):
    got = {}
    for spec in specs:
        name, url = spec.split("=", 1)
        async with session.get(url) as r:
            got[name] = parse_sums(await r.text())
    return got


def metric_means(a, b):
    """Mean of each histogram over the window, ms: {"engine:vllm:time_to_first_token": 31.2, ...}."""
    out = {}
    for name, after in b.items():
        for h, (s1, c1) in after.items():
            s0, c0 = a.get(name, {}).get(h, (0.0, 0.0))
            if c1 > c0:
                key = f"{name}:{h.removesuffix('_seconds')}"
                out[key] = round(1000 * (s1 - s0) / (c1 - c0), 2)
    return out


# ---------------------------------------------------------------- prompts
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "alpha",
    "beta",
    "gamma",
    "delta",
    "river",
    "mountain",
    "cloud",
    "silver",
    "green",
    "orange",
    "table",
    "window",
    "garden",
    "music",
    "number",
    "letter",
    "system",
    "value",
    "simple",
    "random",
    "token",
    "stream",
    "engine",
    "server",
    "client",
    "request",
    "answer",
    "question",
]


def make_prompts(n, input_tokens, tokenizer_dir, seed):
    rnd = random.Random(seed)
    tok = None
    if tokenizer_dir:
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
        except Exception as e:  # fall back to ~1 token per word
            print(f"warning: tokenizer not loaded ({e}); using word count", file=sys.stderr)
    prompts = []
    for i in range(n):
        # unique prefix per request so no prefix-cache sharing between requests
        words = [str(i)] + [rnd.choice(WORDS) for _ in range(input_tokens * 2)]
        text = " ".join(words)
        if tok is not None:
            ids = tok.encode(text).ids[:input_tokens]
            text = tok.decode(ids)
        else:
            text = " ".join(words[:input_tokens])
        prompts.append(text)
    return prompts


# ---------------------------------------------------------------- one request
async def one_request(session, url, body, endpoint):
    rec = {"ok": False, "ttft": None, "e2e": None, "chunks": 0, "out_tokens": None, "err": None}
    t0 = time.perf_counter()
    last = None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                rec["err"] = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return rec
            buf = b""
            async for data in resp.content.iter_any():
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        continue
                    try:
                        ev = json.loads(payload)
                    except ValueError:
                        continue
                    if ev.get("usage"):
                        rec["out_tokens"] = ev["usage"].get("completion_tokens")
                    for ch in ev.get("choices") or []:
                        # a token-bearing event: delta has a "content" key (chat) or "text"
                        # (completions), even when the text is empty (a random-weight model
                        # often emits partial UTF-8 bytes that decode to "")
                        src = (ch.get("delta") or {}) if endpoint == "chat" else ch
                        key = "content" if endpoint == "chat" else "text"
                        if key in src and src[key] is not None:
                            now = time.perf_counter()
                            if rec["ttft"] is None:
                                rec["ttft"] = now - t0
                            rec["chunks"] += 1
                            last = now
                            if src[key] and rec.get("ttft_text") is None:
                                rec["ttft_text"] = now - t0
        rec["e2e"] = time.perf_counter() - t0
        rec["ok"] = rec["ttft"] is not None
        if not rec["ok"]:
            rec["err"] = "no content chunk received"
        ntok = rec["out_tokens"] or rec["chunks"]
        if rec["ok"] and ntok > 1:
            # decode time per token: first token-bearing event .. last token-bearing event
            rec["itl"] = (last - t0 - rec["ttft"]) / (ntok - 1)
    except Exception as e:
        rec["err"] = f"{type(e).__name__}: {e}"
    return rec


def pct(vals, p):
    if not vals:
        return None
    v = sorted(vals)
    k = (len(v) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(v) - 1)
    return v[f] + (v[c] - v[f]) * (k - f)


async def run_level(args, conc, prompts, cpu, first=0):
    url = args.url.rstrip("/") + ("/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions")
    extra = json.loads(args.extra_json) if args.extra_json else {}

    def body(i):
        b = {
            "model": args.model,
            "stream": True,
            "max_tokens": args.output_tokens,
            "stream_options": {"include_usage": True},
        }
        if args.endpoint == "chat":
            b["messages"] = [{"role": "user", "content": prompts[i % len(prompts)]}]
        else:
            b["prompt"] = prompts[i % len(prompts)]
        if args.ignore_eos:
            b["ignore_eos"] = True
        if args.temperature is not None:
            b["temperature"] = args.temperature
        b.update(extra)
        return b

    connector = aiohttp.TCPConnector(limit=conc, force_close=args.no_keepalive)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # warmup (not counted)
        nwarm = args.warmup if args.warmup is not None else max(conc, 4)
        # each level gets its own prompts (from `first` on): a level must not find the previous
        # level's prompts in the prefix cache
        counter = iter(range(first, 10**9))
        if nwarm:
            wl = iter(range(nwarm))

            async def wworker():
                for i in wl:
                    await one_request(session, url, body(args.warmup_first + i), args.endpoint)

            await asyncio.gather(*[wworker() for _ in range(min(conc, nwarm))])
        recs = []
        todo = iter(range(args.requests))

        async def worker():
            for _i in todo:
                recs.append(await one_request(session, url, body(next(counter)), args.endpoint))

        a = cpu.snap()
        ma = await scrape_all(session, args.metrics)
        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(conc)])
        wall = time.perf_counter() - t0
        b = cpu.snap()
        mb = await scrape_all(session, args.metrics)
    ok = [r for r in recs if r["ok"]]
    out_tok = sum((r["out_tokens"] if r["out_tokens"] is not None else r["chunks"]) for r in ok)
    ms = lambda xs: [x * 1000 for x in xs]  # noqa: E731
    ttft = ms([r["ttft"] for r in ok])
    e2e = ms([r["e2e"] for r in ok])
    itl = ms([r["itl"] for r in ok if "itl" in r])
    ttft_text = ms([r["ttft_text"] for r in ok if r.get("ttft_text") is not None])
    res = {
        "url": args.url,
        "model": args.model,
        "label": args.label,
        "concurrency": conc,
        "requests": len(recs),
        "ok": len(ok),
        "errors": len(recs) - len(ok),
        "first_error": next((r["err"] for r in recs if not r["ok"]), None),
        "input_tokens": args.input_tokens,
        "output_tokens": args.output_tokens,
        "keepalive": not args.no_keepalive,
        "wall_s": round(wall, 3),
        "req_per_s": round(len(ok) / wall, 2),
        "out_tok_per_s": round(out_tok / wall, 1),
        "mean_out_tokens": round(out_tok / max(1, len(ok)), 1),
    }
    for name, vals in (("ttft_ms", ttft), ("itl_ms", itl), ("e2e_ms", e2e)):
        res[name] = {
            "p50": round(pct(vals, 50), 2) if vals else None,
            "p90": round(pct(vals, 90), 2) if vals else None,
            "p99": round(pct(vals, 99), 2) if vals else None,
            "mean": round(statistics.fmean(vals), 2) if vals else None,
        }
    res["ttft_text_p50_ms"] = round(pct(ttft_text, 50), 2) if ttft_text else None
    res["cpu"] = CpuWindow.diff(a, b, list(cpu.pids))
    if args.metrics:
        res["server_means_ms"] = metric_means(ma, mb)
    res["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    ap.add_argument("--concurrency", default="1", help="comma list, e.g. 1,8,32")
    ap.add_argument("--requests", type=int, default=200, help="measured requests per level")
    ap.add_argument("--warmup", type=int, default=None, help="warmup requests per level (default max(C,4))")
    ap.add_argument("--input-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--ignore-eos", action="store_true")
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--tokenizer", default=None, help="local model dir with tokenizer.json")
    ap.add_argument("--extra-json", default=None, help="JSON merged into every request body")
    ap.add_argument("--cpu-pid", action="append", default=[], help="NAME=PID to measure (repeatable)")
    ap.add_argument(
        "--no-keepalive",
        action="store_true",
        help="new TCP connection per request (avoids Nagle/delayed-ACK stalls on servers without TCP_NODELAY)",
    )
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=None, help="append one JSON line per level here")
    ap.add_argument("--allow-remote", action="store_true")
    ap.add_argument(
        "--metrics",
        action="append",
        default=[],
        help="NAME=URL of a Prometheus page (vLLM's engine, dynvllm's frontend) scraped around each level; "
        "the means of its latency histograms go into the result (repeatable)",
    )
    args = ap.parse_args()

    host = urllib.parse.urlparse(args.url).hostname or ""
    if not args.allow_remote and not (host.startswith("127.") or host in ("localhost", "::1")):
        sys.exit(f"refusing non-loopback target {host!r} (use --allow-remote)")
    pids = {}
    for spec in args.cpu_pid:
        n, p = spec.split("=", 1)
        pids[n] = int(p)
    try:  # cheaper event loop when available
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    cpu = CpuWindow(pids)
    levels = [int(x) for x in args.concurrency.split(",") if x]
    # measured prompts first (a new range per level), then the warmup prompts, shared by the levels
    args.warmup_first = args.requests * len(levels)
    nwarm = args.warmup if args.warmup is not None else max(max(levels), 4)
    prompts = make_prompts(args.warmup_first + nwarm, args.input_tokens, args.tokenizer, args.seed)
    for n, conc in enumerate(levels):
        res = asyncio.run(run_level(args, conc, prompts, cpu, first=n * args.requests))
        cpus = " ".join(
            f"{k}={v.get('cpu_pct')}%" + (f"(tree {v['cpu_pct_tree']}%)" if "cpu_pct_tree" in v else "")
            for k, v in res["cpu"].items()
            if k != "machine"
        )
        print(
            f"[{args.label}] c={conc:>3} n={res['ok']}/{res['requests']} req/s={res['req_per_s']:.2f} "
            f"tok/s={res['out_tok_per_s']:.0f} TTFT p50/p99={res['ttft_ms']['p50']}/{res['ttft_ms']['p99']} ms "
            f"ITL p50={res['itl_ms']['p50']} ms e2e p50/p99={res['e2e_ms']['p50']}/{res['e2e_ms']['p99']} ms "
            f"cpu: {cpus} machine={res['cpu']['machine']['busy_pct_of_all_cores']}%"
            + (f" ERR: {res['first_error']}" if res["errors"] else "")
            + (f" server means ms: {res['server_means_ms']}" if args.metrics else ""),
            flush=True,
        )
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
