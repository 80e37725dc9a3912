"""A SIMULATED engine for routing experiments at scale (`--engine sim`); it runs no model.

It behaves like vLLM where routing can see it: a scheduler with a running batch and a waiting
queue, a prefix cache of fixed-size blocks with LRU eviction, a timing model (time per prefill
token, time per decode step), KV events in vLLM's ZMQ format (with a replay socket) and the same
load statistics. Dozens fit on two cores. Output tokens are a deterministic function of the
context, not language. Flags (unknown ones are ignored): --sim-prefill-us-per-token,
--sim-decode-ms-per-step, --sim-kv-blocks, --sim-max-num-seqs, --sim-start-s (seconds the engine
takes to start, as a model's load and warm-up would: the worker registers after them).

A step computes at most --sim-max-num-batched-tokens tokens (vLLM's max_num_batched_tokens; 0: no
limit), as vLLM's scheduler fills it: a token for each decoding request first, then the prompts
still prefilling, then new requests; a prompt that does not fit is prefilled in chunks over several
steps, and its first token comes with the step that ends its prompt. With
--sim-async-scheduling 1 (vLLM's default) the next step is scheduled while one runs: a request
that arrives while the engine is busy joins the step after next. Engines given the same
--sim-device share one device: their steps run one at a time (a file lock), as several engines'
steps do on one GPU; give them the whole device's timings. --sim-host-ms-per-step (default 0) is
the part of every step spent on the host (scheduling, sampling, outputs), outside that lock: one
engine's host work overlaps another's kernels, as it does on a GPU. --sim-decode-us-per-kv-token (default
0) adds to a step the time to read the KV of every decoding request's context, so a larger or
longer batch steps slower, as attention makes it on a GPU.

An optional CPU tier (--sim-cpu-blocks N) stands for an offloading connector: blocks the GPU
cache evicts move there (events with medium "CPU", stored as vLLM's connector reports them,
hash only), and a prompt whose prefix continues there loads those blocks back at
--sim-cpu-load-us-per-block each (default: a tenth of prefilling a block) instead of prefilling.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import shlex
import struct
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from dynvllm import protocol
from dynvllm.router import hashing
from dynvllm.runtime.errors import BadRequest
from dynvllm.settings import Settings
from dynvllm.worker.engine import Engine


def sim_args(settings: Settings) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="sim engine", add_help=False)
    ap.add_argument("--sim-prefill-us-per-token", type=float, default=100.0)
    ap.add_argument("--sim-decode-ms-per-step", type=float, default=10.0)
    ap.add_argument("--sim-kv-blocks", type=int, default=2048)
    ap.add_argument("--sim-max-num-seqs", type=int, default=64)
    ap.add_argument("--sim-max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--sim-device", default="")
    ap.add_argument("--sim-async-scheduling", type=int, default=1)
    ap.add_argument("--sim-decode-us-per-kv-token", type=float, default=0.0)
    ap.add_argument("--sim-host-ms-per-step", type=float, default=0.0)
    ap.add_argument("--sim-start-s", type=float, default=0.0)
    ap.add_argument("--sim-cpu-blocks", type=int, default=0)
    ap.add_argument("--sim-cpu-load-us-per-block", type=float, default=None)
    ns, _ = ap.parse_known_args(shlex.split(settings.engine.engine_args) + settings.extra_engine_args)
    return ns


@dataclass
class _Req:
    rid: str
    tokens: list[int]
    max_tokens: int
    keys: list[int]
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    held: list[int] = field(default_factory=list)  # cache keys this request pins
    generated: int = 0
    cached_tokens: int = 0
    todo: int = 0  # prompt tokens still to prefill
    arrived: float = field(default_factory=time.monotonic)
    tail: list[int] = field(default_factory=list)  # the context's last tokens, generated included


class BlockCache:
    """Prefix blocks with reference counts; unreferenced blocks are evicted least recently used,
    into the CPU tier when there is one (itself least recently used)."""

    def __init__(self, capacity: int, salt: int, cpu_capacity: int = 0) -> None:
        self.capacity = capacity
        self.salt = salt
        self.ref: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.cpu_capacity = cpu_capacity
        self.cpu: OrderedDict[int, None] = OrderedDict()
        self.events: list[dict] = []
        #: Blocks the last `acquire` loaded from the CPU tier.
        self.loaded = 0

    def engine_hash(self, key: int) -> int:
        return hash((self.salt, key)) & ((1 << 63) - 1)

    def _evict(self) -> None:
        victim, _ = self.lru.popitem(last=False)
        del self.ref[victim]
        h = self.engine_hash(victim)
        if self.cpu_capacity > 0:
            if victim in self.cpu:
                self.cpu.move_to_end(victim)
            else:
                if len(self.cpu) >= self.cpu_capacity:
                    gone, _ = self.cpu.popitem(last=False)
                    self.events.append(
                        {"type": "BlockRemoved", "block_hashes": [self.engine_hash(gone)], "medium": "CPU"}
                    )
                self.cpu[victim] = None
                # As vLLM's offloading connector reports a store by default: the hash alone.
                self.events.append(
                    {
                        "type": "BlockStored",
                        "block_hashes": [h],
                        "parent_block_hash": None,
                        "token_ids": [],
                        "block_size": 0,
                        "lora_name": None,
                        "medium": "CPU",
                    }
                )
        self.events.append({"type": "BlockRemoved", "block_hashes": [h], "medium": "GPU"})

    def cached_prefix(self, keys: list[int]) -> int:
        n = 0
        for k in keys:
            if k not in self.ref:
                break
            n += 1
        return n

    def acquire(self, keys: list[int], tokens: list[int], block_size: int) -> int | None:
        """Pin a prompt's blocks (storing new ones, loading those the CPU tier holds); the blocks
        found cached (either tier), or None if they cannot fit right now."""
        ref, cpu = self.ref, self.cpu
        hits = 0
        for k in keys:
            if k not in ref and k not in cpu:
                break
            hits += 1
        fresh = [i for i, k in enumerate(keys) if k not in ref]  # need a GPU block each
        pinned = sum(1 for k in keys if ref.get(k) == 0)  # evictable now, not once pinned
        free = self.capacity - len(ref)
        if len(fresh) > free + len(self.lru) - pinned:
            return None
        for k in keys:
            if ref.get(k) == 0:
                self.lru.pop(k, None)
            if k in ref:
                ref[k] += 1
        for _ in range(max(0, len(fresh) - free)):
            self._evict()
        self.loaded = sum(1 for i in fresh if i < hits)
        run: list[int] = []
        for i in [*fresh, -1]:
            if run and (i != run[-1] + 1):
                first = run[0]
                self.events.append(
                    {
                        "type": "BlockStored",
                        "block_hashes": [self.engine_hash(keys[j]) for j in run],
                        "parent_block_hash": self.engine_hash(keys[first - 1]) if first else None,
                        "token_ids": tokens[first * block_size : (run[-1] + 1) * block_size],
                        "block_size": block_size,
                        "lora_name": None,
                        "medium": "GPU",
                    }
                )
                run = []
            if i >= 0:
                ref[keys[i]] = 1
                if keys[i] in cpu:
                    cpu.move_to_end(keys[i])
                run.append(i)
        return hits

    def release(self, keys: list[int]) -> None:
        # Tail blocks first, as vLLM frees them: a prefix outlives the blocks that extend it.
        for k in reversed(keys):
            if k in self.ref:
                self.ref[k] -= 1
                if self.ref[k] == 0:
                    self.lru[k] = None


class SimEngine(Engine):
    kind = "sim"

    def __init__(self) -> None:
        self.waiting: deque[_Req] = deque()
        self.running: dict[str, _Req] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._pub: Any = None
        self._replay: Any = None
        self._seq = 0
        self._load_us = 0.0  # CPU-tier loads of the requests admitted this step
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=10_000)
        self._device: int | None = None  # the shared device's lock file
        #: Seconds this engine's step sleeps have overrun their costs so far: asyncio's epoll waits
        #: whole milliseconds, rounded up (a 2.1 ms step slept ~3.1, a 4.4 ms one ~5), and the next
        #: sleeps are shortened by it, so a step's cost holds on average and the error does not
        #: depend on a step's length (which favoured fewer, larger batches).
        self._overrun = 0.0

    def check_args(self, settings: Settings) -> None:
        if not settings.engine.model:
            raise ValueError("the sim engine still needs --model: a folder with a tokenizer and config.json")
        sim_args(settings)

    def start(
        self,
        settings: Settings,
        overrides: dict[str, Any],
        snapshot: Any,
        kv_endpoint: str | None,
        kv_replay: str | None,
    ) -> None:
        from dynvllm.models.hub import resolve_model

        self.args = sim_args(settings)
        self.snapshot = snapshot
        self.path = resolve_model(settings.engine.model or "", settings.engine.revision)
        cfg = json.loads((Path(self.path) / "config.json").read_text())
        self.vocab = int(cfg.get("vocab_size", 32000))
        self.context_length = int(settings.engine.max_model_len or cfg.get("max_position_embeddings", 4096))
        self.block_size = int(settings.engine.block_size or 32)
        self.cache = BlockCache(self.args.sim_kv_blocks, salt=id(self), cpu_capacity=self.args.sim_cpu_blocks)
        per_block = self.args.sim_cpu_load_us_per_block
        if per_block is None:
            per_block = 0.1 * self.block_size * self.args.sim_prefill_us_per_token
        self.cpu_load_us = per_block
        if self.args.sim_device:
            lock = Path(tempfile.gettempdir()) / f"dynvllm-sim-device-{self.args.sim_device}.lock"
            # Held for the engine's life; its first 8 bytes: when the device was last released.
            self._device = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # (not O_APPEND: pwrite)
        if kv_endpoint:
            import zmq

            ctx: zmq.Context = zmq.Context.instance()
            self._pub = ctx.socket(zmq.PUB)
            self._pub.connect(kv_endpoint)
            if kv_replay:
                self._replay = ctx.socket(zmq.ROUTER)
                self._replay.bind(kv_replay)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def card(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "tokenizer": self.path,
            "context_length": self.context_length,
            "block_size": self.block_size,
            "kv_blocks": self.args.sim_kv_blocks,
            "max_num_seqs": self.args.sim_max_num_seqs,
        }

    # ---- requests ------------------------------------------------------------------
    async def generate(self, payload: Any) -> AsyncIterator[dict]:
        checked = protocol.parse_generate(payload)
        if checked.dp_rank:
            raise BadRequest("the sim engine has one data-parallel rank (0)")
        if checked.images:
            raise BadRequest("the sim engine takes text only")
        rid, ids, sampling = checked.request_id, checked.token_ids, checked.sampling
        if int(sampling.get("n") or 1) != 1:
            raise BadRequest("the sim engine supports n=1 only")
        if len(ids) >= self.context_length:
            raise BadRequest(f"prompt of {len(ids)} tokens exceeds the context length {self.context_length}")
        req = _Req(
            rid,
            ids,
            int(sampling.get("max_tokens") or 16),
            hashing.chain(ids, self.block_size),
        )
        self.waiting.append(req)
        self._wake.set()
        try:
            while True:
                item = await req.out.get()
                yield item
                if item["finish_reason"] is not None:
                    return
        finally:
            self._finish(req)

    def _finish(self, req: _Req) -> None:
        if self.running.pop(req.rid, None) is not None:
            self.cache.release(req.held)
        elif req in self.waiting:
            self.waiting.remove(req)

    async def canary(self) -> None:
        async for _ in self.generate(
            {"request_id": f"canary-{time.monotonic()}", "token_ids": [0], "sampling": {"max_tokens": 1}}
        ):
            pass

    # ---- the scheduler -----------------------------------------------------------------
    async def _loop(self) -> None:
        # The worker's canary waits for this loop, so the worker registers once "started".
        await asyncio.sleep(self.args.sim_start_s)
        scheduled = float("inf")  # when the step now starting was scheduled (vLLM: one step ahead)
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                scheduled = float("inf")
            now = time.monotonic()
            cutoff, scheduled = (scheduled, now) if self.args.sim_async_scheduling else (now, now)
            budget = self.args.sim_max_num_batched_tokens or 1 << 62
            decoding = [r for r in self.running.values() if not r.todo]
            budget -= len(decoding)  # decodes first
            kv_read = (
                sum(len(r.tokens) + r.generated for r in decoding)
                if self.args.sim_decode_us_per_kv_token
                else 0
            )
            prefill_tokens = 0
            for req in self.running.values():  # then prompts that are part way (admission order)
                chunk = min(req.todo, max(0, budget))
                req.todo -= chunk
                budget -= chunk
                prefill_tokens += chunk
            prefill_tokens += self._admit(budget, cutoff)
            if not self.running and self.waiting and self.waiting[0].arrived > cutoff:
                # Nothing was scheduled ahead, so vLLM would not run an empty step first: admit
                # the newcomer now.
                scheduled = float("inf")
                continue
            self._publish_events()
            self._serve_replay()
            step = (
                self.args.sim_decode_ms_per_step / 1000
                + prefill_tokens * self.args.sim_prefill_us_per_token / 1e6
                + self._load_us / 1e6
                + kv_read * self.args.sim_decode_us_per_kv_token / 1e6
            )
            self._load_us = 0.0
            await self._step(step)
            for req in list(self.running.values()):
                if not req.todo:
                    self._emit(req)
            s = self.snapshot
            s.running, s.waiting = len(self.running), len(self.waiting)
            s.kv_usage = len(self.cache.ref) / max(1, self.cache.capacity)
            s.updated = time.time()

    async def _step(self, seconds: float) -> None:
        host = self.args.sim_host_ms_per_step / 1000
        if self._device is None:
            await self._sleep(seconds + host)
            return
        if host:
            await self._sleep(host)
        fd = self._device
        asked = time.monotonic()
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        try:
            # The device sat idle from its release until this engine's thread took the lock and
            # its event loop woke (~0.3 ms a step on a busy host); a GPU switches in microseconds.
            # That time is taken off this step, as an overrun is.
            released = struct.unpack("d", os.pread(fd, 8, 0).ljust(8, b"\0"))[0]
            if released > asked:
                self._owe(time.monotonic() - released)
            await self._sleep(seconds)
        finally:
            os.pwrite(fd, struct.pack("d", time.monotonic()), 0)
            fcntl.flock(fd, fcntl.LOCK_UN)

    async def _sleep(self, seconds: float) -> None:
        t0 = time.monotonic()
        target = seconds - self._overrun
        if target > 0:
            await asyncio.sleep(target)
        self._owe(time.monotonic() - t0 - seconds)

    def _owe(self, seconds: float) -> None:
        """Count `seconds` against the next sleeps. A longer stall (the host busy) is repaid only up
        to 10 ms: not a burst of empty steps."""
        self._overrun = min(0.01, self._overrun + seconds)

    def _admit(self, budget: int, cutoff: float) -> int:
        tokens = 0
        while self.waiting and len(self.running) < self.args.sim_max_num_seqs and budget > 0:
            req = self.waiting[0]
            if req.arrived > cutoff:
                break  # came after this step was scheduled
            hits = self.cache.acquire(req.keys, req.tokens, self.block_size)
            if hits is None:
                break  # no room until running requests finish
            self.waiting.popleft()
            req.held = list(req.keys)
            req.cached_tokens = hits * self.block_size
            self.snapshot.prefix_queries += len(req.tokens)
            self.snapshot.prefix_hits += req.cached_tokens
            # vLLM computes at least the prompt's last token; the rest of the prompt waits for
            # later steps when the budget runs out.
            todo = max(1, len(req.tokens) - req.cached_tokens)
            chunk = min(todo, budget)
            req.todo = todo - chunk
            budget -= chunk
            tokens += chunk
            self._load_us += self.cache.loaded * self.cpu_load_us
            self.running[req.rid] = req
        return tokens

    def _emit(self, req: _Req) -> None:
        # A function of the context alone (its last tokens and length), like greedy decoding: a
        # request resent with its generated tokens appended continues with the same tokens.
        tail = req.tail or req.tokens[-3:]
        tok = hash((tuple(tail), len(req.tokens) + req.generated)) % self.vocab
        req.tail = [*tail, tok][-3:]
        req.generated += 1
        done = req.generated >= req.max_tokens
        extra: dict[str, Any] = (
            {"prompt_tokens": len(req.tokens), "cached_tokens": req.cached_tokens}
            if req.generated == 1
            else {}
        )
        req.out.put_nowait(protocol.delta(0, [tok], "length" if done else None, **extra))
        if done:
            self._finish(req)

    def _publish_events(self) -> None:
        if not self.cache.events:
            return
        events, self.cache.events = self.cache.events, []
        if self._pub is None:
            return
        payload = msgpack.packb([time.time(), events, 0])
        self._buffer.append((self._seq, payload))
        self._pub.send_multipart([b"kv", self._seq.to_bytes(8, "big"), payload])
        self._seq += 1

    def _serve_replay(self) -> None:
        """Answer replay requests the way vLLM's publisher does."""
        if self._replay is None or not self._replay.poll(0):
            return
        client, _, start = self._replay.recv_multipart()
        first = int.from_bytes(start, "big")
        for seq, buf in self._buffer:
            if seq >= first:
                self._replay.send_multipart([client, b"", b"kv", seq.to_bytes(8, "big"), buf])
        self._replay.send_multipart([client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""])

    def shutdown(self) -> None:
        if self._task:
            self._task.cancel()
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        if self._device is not None:
            os.close(self._device)
            self._device = None
