"""A minimal served instance in its own process: registers, serves a stream, heartbeats."""

import asyncio
import signal
import sys


async def main(url: str, namespace: str) -> None:
    from dynvllm.runtime import nats as natsrt
    from dynvllm.runtime.discovery import Instance, Lease
    from dynvllm.runtime.streams import StreamServer
    from dynvllm.settings import RuntimeSettings

    async def ticks(payload):
        i = 0
        while True:
            i += 1
            yield i
            await asyncio.sleep(0.01)

    server = StreamServer({"ticks": ticks})
    port = await server.start()
    nc = await natsrt.connect(RuntimeSettings(nats_url=url))
    inst = Instance.new(
        "worker",
        role="test",
        host="127.0.0.1",
        port=port,
        endpoints=["ticks"],
        card={"model": "m", "context_length": 128},
    )
    lease = Lease(nc, namespace, inst, interval=0.2)
    await lease.start()
    print("READY", inst.id, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await lease.stop()
    await server.close()
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
