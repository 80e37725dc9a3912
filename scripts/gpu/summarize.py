#!/usr/bin/env python3
"""summarize.py FILE... -- medians per (server, concurrency) of bench_one.sh's JSON lines, and
dynvllm/vLLM ratios. Labels start with `vllm` or `dyn` (e.g. vllm-1, dyn-2).

`path x` is the client's mean inter-token time over the engine's own (its Prometheus histogram
over the same level): what a server's path from engine to client adds per token, apart from how
fast that start's engine steps (which varies more between starts than the 2% goal allows)."""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def main() -> None:
    rows: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for path in sys.argv[1:]:
        for line in open(path):
            r = json.loads(line)
            server = "vllm" if r["label"].startswith("vllm") else "dynvllm"
            rows[(server, r["concurrency"])].append(r)
    levels = sorted({c for _, c in rows})

    def med(server: str, c: int, get) -> float:  # type: ignore[no-untyped-def]
        vals = [get(r) for r in rows.get((server, c), []) if get(r) is not None]
        return statistics.median(vals) if vals else float("nan")

    def path(r: dict) -> float | None:
        engine = r.get("server_means_ms", {}).get("engine:vllm:inter_token_latency")
        return r["itl_ms"]["mean"] / engine if engine else None

    print(
        "c     req/s vLLM  req/s dyn  ratio  text-TTFT p50 ms v/d   ITL p50 ms v/d   ITL p99 ms v/d"
        "  path x v/d     runs"
    )
    for c in levels:
        rv, rd = med("vllm", c, lambda r: r["req_per_s"]), med("dynvllm", c, lambda r: r["req_per_s"])
        tv, td = (
            med("vllm", c, lambda r: r["ttft_text_p50_ms"]),
            med("dynvllm", c, lambda r: r["ttft_text_p50_ms"]),
        )
        iv, idn = (
            med("vllm", c, lambda r: r["itl_ms"]["p50"]),
            med("dynvllm", c, lambda r: r["itl_ms"]["p50"]),
        )
        pv, pd = med("vllm", c, lambda r: r["itl_ms"]["p99"]), med("dynvllm", c, lambda r: r["itl_ms"]["p99"])
        xv, xd = med("vllm", c, path), med("dynvllm", c, path)
        n = f"{len(rows.get(('vllm', c), []))}/{len(rows.get(('dynvllm', c), []))}"
        print(
            f"{c:<5d} {rv:10.2f} {rd:10.2f} {rd / rv:6.3f}  {tv:8.1f} / {td:<8.1f}  {iv:6.2f} / {idn:<6.2f}"
            f"  {pv:6.2f} / {pd:<6.2f}  {xv:5.3f} / {xd:<5.3f}  {n}"
        )


if __name__ == "__main__":
    main()
