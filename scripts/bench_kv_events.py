"""What vLLM's KV cache events cost its engine core per step, measured on one engine.

    python scripts/bench_kv_events.py MODEL [--steps 6000] [--block 4] [--concurrency 16]
        [--isl 1000] [--osl 200] [--block-size 32] [--graphs]

One engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) with KV events configured
as a dynvllm worker configures them (ZMQ publisher, a subscriber process draining the events as
the worker's relay does) under a steady closed loop of `--concurrency` requests of distinct random
prompts (no cache hits; a finished request is replaced at once). Every `--block` steps the engine
switches between three modes, in alternating order, so that a busy machine's drift falls on all
of them alike:
  off     events not built (vLLM's NullEventPublisher; the block pool's events switch off),
  zmq     vLLM's ZmqEventPublisher: the step queues its batch, a thread encodes and sends it,
  inline  the same sockets, the batch encoded and sent on the step's own thread (no hand-off).
A step is one `LLMEngine.step()` (engine-core step plus output processing, the same in every
mode); vLLM's threaded publisher may finish a batch during the next step, so a block of a few
steps (`--block 4`) keeps that spill mostly inside its own mode. Printed per mode: decode-only
steps (every running request decoding, none prefilling) median and mean, steps with a prefill,
and the decode-step difference to `off` paired by cycle (median and quartiles); the events' bytes.
Measured (2026-12-05, 2-core CPU VM, tiny model): docs/benchmarks.md, GPU sixth round, "The per-token gap".
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time

from benchkit import free_port

SUBSCRIBER = r"""
import json, signal, sys, zmq
sock = zmq.Context().socket(zmq.SUB); sock.connect(sys.argv[1]); sock.setsockopt(zmq.SUBSCRIBE, b"")
n = {"batches": 0, "bytes": 0}
def done(*_):
    print(json.dumps(n), flush=True); sys.exit(0)
signal.signal(signal.SIGTERM, done)
while True:
    frames = sock.recv_multipart(); n["batches"] += 1; n["bytes"] += len(frames[-1])
"""


class InlinePublisher:
    """Encodes and sends a batch on the caller's thread, on the ZMQ publisher's own socket."""

    def __init__(self, zmq_publisher) -> None:  # type: ignore[no-untyped-def]
        import msgspec

        self.zpub = zmq_publisher
        self.pack = msgspec.msgpack.Encoder()
        self.seq = 1 << 40  # apart from the threaded publisher's numbers

    def publish(self, batch) -> None:  # type: ignore[no-untyped-def]
        self.seq += 1
        self.zpub._pub.send_multipart(
            (self.zpub._topic_bytes, self.seq.to_bytes(8, "big"), self.pack.encode(batch))
        )


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=6000, help="measured steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--block", type=int, default=4, help="steps per mode before switching")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--isl", type=int, default=1000)
    ap.add_argument("--osl", type=int, default=200)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--kv-bytes", type=int, default=512 << 20)
    ap.add_argument("--port", type=int, default=0, help="the events' port (default: a free one)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--graphs", action="store_true", help="compile and capture graphs (GPU); default eager")
    args = ap.parse_args()

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # One torch thread, as vLLM sets in its engine-core process: spinning OpenMP threads on a busy
    # machine stretch CPU steps 30-fold.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from vllm import SamplingParams
    from vllm.config import KVEventsConfig
    from vllm.distributed.kv_events import NullEventPublisher
    from vllm.engine.arg_utils import EngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.llm_engine import LLMEngine

    port = args.port or free_port()
    kv = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=f"tcp://*:{port}", topic="kv")
    sub = subprocess.Popen(
        [sys.executable, "-c", SUBSCRIBER, f"tcp://127.0.0.1:{port}"], stdout=subprocess.PIPE, text=True
    )
    engine = LLMEngine.from_engine_args(
        EngineArgs(
            model=args.model,
            enforce_eager=not args.graphs,
            max_model_len=args.isl + args.osl + 64,
            kv_cache_memory_bytes=args.kv_bytes,
            block_size=args.block_size,
            enable_prefix_caching=True,
            kv_events_config=kv,
            max_num_seqs=max(args.concurrency, 16),
        )
    )
    sched = engine.engine_core.engine_core.scheduler
    publishers = {"off": NullEventPublisher(), "zmq": sched.kv_event_publisher}
    publishers["inline"] = InlinePublisher(publishers["zmq"])
    manager = sched.kv_cache_manager

    def switch(mode: str) -> None:
        sched.kv_event_publisher = publishers[mode]
        manager.enable_kv_cache_events = manager.block_pool.enable_kv_cache_events = mode != "off"

    vocab = engine.vllm_config.model_config.get_vocab_size()
    rng = random.Random(args.seed)
    params = SamplingParams(
        max_tokens=args.osl, ignore_eos=True, detokenize=False, output_kind=RequestOutputKind.DELTA
    )
    count = 0

    def add() -> None:
        nonlocal count
        prompt = TokensPrompt(prompt_token_ids=[rng.randrange(3, vocab) for _ in range(args.isl)])
        engine.add_request(f"r{count}", prompt, params)
        count += 1

    scheduled = [0]
    schedule = sched.schedule

    def counting_schedule(*a, **kw):  # type: ignore[no-untyped-def]
        out = schedule(*a, **kw)
        scheduled[0] = out.total_num_scheduled_tokens
        return out

    sched.schedule = counting_schedule
    for _ in range(args.concurrency):
        add()
    modes = ["off", "zmq", "inline"]
    # (cycle, mode, step seconds, decode only) of every measured step
    rows: list[tuple[int, str, float, bool]] = []
    step = cycle = 0
    while step < args.warmup + args.steps:
        order = modes if cycle % 2 == 0 else modes[::-1]
        for mode in order:
            switch(mode)
            for _ in range(args.block):
                running = len(sched.running)
                t0 = time.perf_counter()
                outs = engine.step()
                dt = time.perf_counter() - t0
                step += 1
                if step > args.warmup:
                    rows.append((cycle, mode, dt, scheduled[0] == running == args.concurrency))
                for out in outs:
                    if out.finished:
                        add()
        cycle += 1
    switch("off")
    time.sleep(0.5)
    sub.terminate()
    got = sub.communicate(timeout=10)[0].strip().splitlines()
    publishers["zmq"].shutdown()

    print(
        f"{args.model}: c={args.concurrency} ISL {args.isl} OSL {args.osl} block size {args.block_size}, "
        f"{len(rows)} steps, the mode switching every {args.block} step(s)"
    )
    decode = {m: [dt for _, mm, dt, d in rows if mm == m and d] for m in modes}
    mixed = {m: [dt for _, mm, dt, d in rows if mm == m and not d] for m in modes}
    by_cycle: dict[int, dict[str, list[float]]] = {}
    for c, m, dt, d in rows:
        if d:
            by_cycle.setdefault(c, {}).setdefault(m, []).append(dt)
    for mode in modes:
        dec, mix = decode[mode], mixed[mode]
        line = (
            f"  {mode:>6}: decode-only steps n={len(dec)} median {statistics.median(dec) * 1e3:.3f} ms"
            f" mean {statistics.fmean(dec) * 1e3:.3f} ms; steps with a prefill n={len(mix)}"
            f" mean {statistics.fmean(mix) * 1e3:.2f} ms"
        )
        if mode != "off":
            diffs = [
                (statistics.fmean(v[mode]) - statistics.fmean(v["off"])) * 1e6
                for v in by_cycle.values()
                if mode in v and "off" in v
            ]
            lo, mid, hi = quartiles(diffs)
            line += f"; decode step vs off, paired by cycle: median {mid:+.1f} us"
            line += f" (quartiles {lo:+.1f} .. {hi:+.1f})"
        print(line)
    if got:
        print(f"  events received (zmq + inline steps): {got[-1]}")


if __name__ == "__main__":
    main()
