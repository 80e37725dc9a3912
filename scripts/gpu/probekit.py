"""What the GPU probes share: the word list their prompts are drawn from, and one streamed chat
request read the way a client sees it (time to the first text, the text, the final usage)."""

import time

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "river",
    "mountain",
    "city",
    "road",
    "tree",
    "house",
    "cat",
    "dog",
    "bird",
    "fish",
    "stone",
    "cloud",
]


def chat_body(messages: list, max_tokens: int = 32) -> dict:
    return {
        "model": "m",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_chat(session, url: str, body: dict):
    """POST a streamed chat completion; returns (response, first-text seconds or None, text,
    usage). The response's status and headers are readable after the call."""
    import json

    t0 = time.perf_counter()
    first, text, usage = None, "", {}
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            return r, None, "", {}
        async for line in r.content:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices") or []:
                piece = (c.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter() - t0
                text += piece
            usage = chunk.get("usage") or usage
    return r, (first if first is not None else time.perf_counter() - t0), text, usage
