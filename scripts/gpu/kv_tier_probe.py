"""kv_tier_probe.py NATS_URL NAMESPACE OUTFILE -- counts the KV events that workers relay to the
routers of NAMESPACE, by kind and tier (the medium the engine names: its own GPU cache, or "CPU"
for vLLM's offloading connector), until SIGTERM/SIGINT; then appends one JSON line to
OUTFILE. It answers whether an engine's offload tier reaches the router's index at all."""

import asyncio
import json
import signal
import sys
import time
from collections import Counter

import nats

from dynvllm.router.tiers import NAMES
from dynvllm.runtime.kv_topic import KV_EVENTS


async def main(url: str, namespace: str, outfile: str) -> None:
    nc = await nats.connect(url)
    batches, blocks = Counter(), Counter()

    async def on_msg(msg) -> None:
        batch = KV_EVENTS.decode(msg.data)
        # Relayed as router events: ("stored"|"removed", keys[, tier]) or ("cleared",).
        for event in batch.events:
            kind = event[0]
            if kind in ("stored", "removed"):
                tier = NAMES.get(event[2], event[2]) if len(event) > 2 else "GPU"
                key, n = f"{kind}:{tier}", len(event[1])
            else:
                key, n = str(kind), 1
            batches[key] += 1
            blocks[key] += n

    await nc.subscribe(KV_EVENTS.subject(namespace), cb=on_msg)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    t0 = time.time()
    await done.wait()
    await nc.drain()
    row = {"label": f"tier-events-{namespace}", "seconds": round(time.time() - t0, 1)}
    row.update(events=dict(batches), blocks=dict(blocks))
    with open(outfile, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
