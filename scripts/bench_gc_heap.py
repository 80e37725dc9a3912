"""The garbage collector's cost in a worker-like process, with and without a frozen start-up heap.

A worker holds ~600k long-lived objects once started (vLLM, torch, the tokenizer); each engine
step it decodes 1,024 outputs (a list each) and keeps per-request objects alive while requests
run. This models that pattern in two fresh interpreters, one plain and one that freezes its heap
after start-up as `dynvllm.heap.freeze` does, and prints ms per step and collections per
generation for each, and the ratio.

    python scripts/bench_gc_heap.py [STEPS]      # default 2000
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import gc, json, sys, time
import msgpack
freeze, steps = sys.argv[1] == "freeze", int(sys.argv[2])
heap = [{"k": [i]} for i in range(600_000)]
gc.collect()
if freeze:
    gc.freeze()
inflight = {}
payload = msgpack.packb([[i, [1], None, None] for i in range(1024)])
def post():  # a Python call right after the decode: where CPython 3.12 runs a scheduled collection
    return time.monotonic()
before = [s["collections"] for s in gc.get_stats()]
t = time.perf_counter()
for step in range(steps):
    outs = msgpack.unpackb(payload)
    post()
    for o in outs:
        inflight[(step * 1024 + o[0]) % 50_000] = [o[1], {}]
ms = 1e3 * (time.perf_counter() - t) / steps
counts = [s["collections"] - b for s, b in zip(gc.get_stats(), before)]
print(json.dumps({"ms_per_step": ms, "collections": counts}))
"""


def run(mode: str, steps: int) -> dict:
    cmd = [sys.executable, "-c", CHILD, mode, str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    plain, frozen = run("plain", steps), run("freeze", steps)
    print(f"python {sys.version.split()[0]}, {steps} steps")
    for name, r in (("plain", plain), ("frozen", frozen)):
        print(f"{name:7s} {r['ms_per_step']:.3f} ms/step, collections by generation {r['collections']}")
    print(f"frozen/plain {frozen['ms_per_step'] / plain['ms_per_step']:.2f}")


if __name__ == "__main__":
    main()
