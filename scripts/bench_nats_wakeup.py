#!/usr/bin/env python
"""What a NATS message that arrives by itself costs its receiver, by how it is received.

A publisher sends N small messages (a decision batch's size) one every GAP seconds; a receiver
process takes them and reports its CPU per message. Receivers, run in turn (ABAB, BABA):
  nats-py   a nats-py subscription with a callback (each message wakes the process)
  protocol  a bare asyncio protocol speaking the subscriber's part of NATS (wakes it too)
  pulled    `dynvllm.runtime.nats_pull.Pulled`, read every 200 ms as a frontend's timer does
            (a frontend that routes reads it then too, while awake anyway)

    .venv/bin/python scripts/bench_nats_wakeup.py [--messages 1500] [--gap 0.004] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time

import msgpack

PAYLOAD = msgpack.packb(
    ["abcdef012345", 1, [[0, 5, "worker-1", 0, 12.0, list(range(1 << 40, (1 << 40) + 12))]], None, False]
)
SUBJECT = "bench.wakeup"


async def receive(mode: str, url: str, count: int) -> None:
    got = 0

    def take(data: bytes) -> None:
        nonlocal got
        msgpack.unpackb(data, raw=False)
        got += 1

    if mode == "nats-py":
        import nats

        nc = await nats.connect(url)

        async def cb(msg) -> None:
            take(msg.data)

        await nc.subscribe(SUBJECT, cb=cb)
        await nc.flush()
    elif mode == "protocol":
        from dynvllm.runtime.nats_pull import MSG, PING, Frames

        class Protocol(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                self.transport, self.frames = transport, Frames()
                transport.write(b'CONNECT {"verbose":false}\r\nSUB ' + SUBJECT.encode() + b" 1\r\n")

            def data_received(self, data: bytes) -> None:
                for frame in self.frames.feed(data):
                    if frame[0] == MSG:
                        take(frame[2])
                    elif frame[0] == PING:
                        self.transport.write(b"PONG\r\n")

        host, port = url.removeprefix("nats://").split(":")
        await asyncio.get_running_loop().create_connection(Protocol, host, int(port))
    else:
        from dynvllm.runtime.nats_pull import Pulled

        pulled = await Pulled.open([url], SUBJECT)
    print("ready", flush=True)
    t0, c0 = time.monotonic(), time.process_time()
    while got < count and time.monotonic() - t0 < 120:
        await asyncio.sleep(0.2)
        if mode == "pulled":
            for _, data in pulled.read():
                take(data)
    print(f"cpu_us_per_msg {(time.process_time() - c0) * 1e6 / max(1, got):.1f} got {got}", flush=True)


async def publish(url: str, count: int, gap: float) -> None:
    import nats

    nc = await nats.connect(url)
    due = time.monotonic()
    for _ in range(count):
        await nc.publish(SUBJECT, PAYLOAD)
        await nc.flush()
        due += gap
        await asyncio.sleep(max(0.0, due - time.monotonic()))
    await nc.close()


def one(mode: str, url: str, args) -> float:
    recv = subprocess.Popen(
        [sys.executable, __file__, "--receive", mode, url, str(args.messages)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert recv.stdout is not None
    assert recv.stdout.readline().strip() == "ready"
    asyncio.run(publish(url, args.messages, args.gap))
    out = recv.communicate(timeout=180)[0]
    return float(out.split()[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=1500)
    ap.add_argument("--gap", type=float, default=0.004, help="seconds between messages")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--receive", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.receive:
        mode, url, count = args.receive
        asyncio.run(receive(mode, url, int(count)))
        return
    from dynvllm.runtime.nats import EmbeddedNats

    modes = ["nats-py", "protocol", "pulled"]
    rows: dict[str, list[float]] = {m: [] for m in modes}
    with EmbeddedNats() as server:
        for r in range(args.rounds):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                rows[mode].append(one(mode, server.url, args))
                print(f"round {r + 1} {mode:9s} {rows[mode][-1]:7.1f} us/message", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')}, {args.messages} messages, one every {args.gap * 1000:g} ms")
    for mode in modes:
        print(
            f"{mode:9s} receiver CPU per message: median {statistics.median(rows[mode]):.1f} us  {rows[mode]}"
        )


if __name__ == "__main__":
    main()
