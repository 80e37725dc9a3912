"""mm_probe.py URL MODEL LABEL OUTFILE [N C DISTINCT SIZE] -- image chat load on one server.

N requests (default 128), C in flight (16), each with one of DISTINCT images (8, SIZE x SIZE pixels,
default 112) in turn, so every image after the first DISTINCT requests is one the service has seen;
greedy, 16 output tokens. Prints and appends one JSON line: images/s, latency p50/p90, the greedy
text of each distinct image (compare two servers' lines), prompt tokens, and how the
`x-dynvllm-encode` header says each image was encoded (remote, cached, local)."""

import asyncio
import base64
import io
import json
import statistics
import sys
import time
from collections import Counter

import aiohttp
from PIL import Image


def image(i: int, size: int) -> str:
    img = Image.new("RGB", (size, size))
    img.putdata(
        [
            ((x * (37 + i)) % 256, (y * (91 + 7 * i)) % 256, ((x + y) * (13 + i)) % 256)
            for y in range(size)
            for x in range(size)
        ]
    )
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def main() -> None:
    url, model, label, outfile = sys.argv[1:5]
    n, c, distinct, size = (int(a) for a in (sys.argv[5:9] + ["128", "16", "8", "112"][len(sys.argv) - 5 :]))
    images = [image(i, size) for i in range(distinct)]
    texts: dict[int, str] = {}
    prompt_tokens: dict[int, int] = {}
    how: Counter = Counter()
    lat: list[float] = []
    errors: list[str] = []
    queue: asyncio.Queue = asyncio.Queue()
    for k in range(n):
        queue.put_nowait(k)

    async def one(session: aiohttp.ClientSession, k: int) -> None:
        i = k % distinct
        body = {
            "model": model,
            "max_tokens": 16,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": images[i]}},
                        {"type": "text", "text": f"describe picture {i}"},
                    ],
                }
            ],
        }
        t0 = time.perf_counter()
        async with session.post(f"{url}/v1/chat/completions", json=body) as r:
            data = await r.json()
            if r.status != 200:
                errors.append(f"{r.status} {str(data)[:200]}")
                return
            lat.append(time.perf_counter() - t0)
            how[(r.headers.get("x-dynvllm-encode") or "none").split(":")[0]] += 1
            texts.setdefault(i, data["choices"][0]["message"]["content"])
            prompt_tokens.setdefault(i, data["usage"]["prompt_tokens"])

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            await one(session, queue.get_nowait())

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await one(session, 0)  # warm-up: the first image through every stage
        texts.clear(), prompt_tokens.clear(), how.clear(), lat.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(c)))
        wall = time.perf_counter() - t0
    lat.sort()
    row = {
        "label": label,
        "requests": n,
        "concurrency": c,
        "distinct_images": distinct,
        "ok": len(lat),
        "errors": errors[:5],
        "images_s": round(len(lat) / wall, 2),
        "latency_p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
        "latency_p90_ms": round(1000 * lat[int(0.9 * (len(lat) - 1))], 1) if lat else None,
        "encode": dict(how),
        "prompt_tokens": [prompt_tokens.get(i) for i in range(distinct)],
        "texts": [texts.get(i) for i in range(distinct)],
    }
    print(json.dumps(row), flush=True)
    with open(outfile, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
