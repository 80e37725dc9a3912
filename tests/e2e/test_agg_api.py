"""The OpenAI API of `dynvllm serve agg` through the real `openai` client, against real vLLM."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.helpers import all_worker_stats, want_reference

PROMPTS = ["the cat sees a dog and", "red river runs where the old mountain", "why is the model slow?"]
CHAT = [
    [{"role": "user", "content": "the quick bird finds a tree"}],
    [{"role": "system", "content": "you are a router"}, {"role": "user", "content": "where is the cache?"}],
]


@pytest.fixture(scope="module")
def client(agg_service):
    url, _ = agg_service
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


_GREEDY = {"max_tokens": 24, "temperature": 0}
# vLLM's offline greedy output for the same prompts and parameters.
REFERENCE = want_reference(
    "agg_api",
    [{"kind": "completion", "input": p, "params": {**_GREEDY, "ignore_eos": True}} for p in PROMPTS]
    + [{"kind": "chat", "input": m, "params": _GREEDY} for m in CHAT]
    + [{"kind": "completion", "input": PROMPTS[0], "params": {**_GREEDY, "stop": ["e"]}}],
)


@pytest.fixture(scope="module")
def reference(references):
    return references[REFERENCE]


def test_models_lists_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completions_equal_vllm_offline(client, reference):
    for i, prompt in enumerate(PROMPTS):
        # ignore_eos: the full 24 tokens whatever the random model emits, so usage is exact.
        kw = {"max_tokens": 24, "temperature": 0, "extra_body": {"ignore_eos": True}}
        r = client.completions.create(model="tiny", prompt=prompt, **kw)
        assert r.choices[0].text == reference[i][0]
        assert r.usage.completion_tokens == 24
        assert r.choices[0].finish_reason == "length"
        streamed = client.completions.create(model="tiny", prompt=prompt, stream=True, **kw)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == reference[i][0]


def test_chat_equal_vllm_offline(client, reference):
    for j, messages in enumerate(CHAT):
        want = reference[len(PROMPTS) + j][0]
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
        assert r.choices[0].message.content == want
        assert r.choices[0].message.role == "assistant"
        chunks = list(
            client.chat.completions.create(
                model="tiny",
                messages=messages,
                max_tokens=24,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        usage = chunks[-1].usage
        assert usage.completion_tokens == 24 and usage.prompt_tokens == r.usage.prompt_tokens > 5


def test_stop_string_matches_vllm(client, reference):
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=["e"])
    assert r.choices[0].text == reference[-1][0]
    assert "e" not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"


def test_max_tokens_and_usage(client):
    r = client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + 3


def test_n_and_seed_and_logprobs(client):
    r = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=8, temperature=1.0, seed=7, n=2)
    assert len(r.choices) == 2 and {c.index for c in r.choices} == {0, 1}
    again = client.completions.create(
        model="tiny", prompt=PROMPTS[2], max_tokens=8, temperature=1.0, seed=7, n=2
    )
    assert sorted(c.text for c in r.choices) == sorted(c.text for c in again.choices)
    c = client.chat.completions.create(
        model="tiny", messages=CHAT[0], max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = c.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert item.logprob == pytest.approx(max(t.logprob for t in item.top_logprobs), abs=1e-4)


def test_32_concurrent_streams_are_each_correct(agg_service, client):
    url, _ = agg_service
    prompts = [f"{PROMPTS[i % 3]} {i}" for i in range(32)]
    expected = [
        client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0).choices[0].text
        for p in prompts[:4]
    ]

    async def one(ac: openai.AsyncOpenAI, p: str) -> str:
        stream = await ac.completions.create(
            model="tiny", prompt=p, max_tokens=16, temperature=0, stream=True
        )
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        try:
            return await asyncio.gather(*(one(ac, p) for p in prompts))
        finally:
            await ac.close()

    got = asyncio.run(main())
    assert got[:4] == expected
    assert all(len(t) > 0 for t in got)
    singles = [
        client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0).choices[0].text
        for p in prompts[4:8]
    ]
    assert got[4:8] == singles


def _worker_stats() -> list[dict]:
    from dynvllm.runtime import state

    return all_worker_stats(state.resolve_nats_url(None, "e2e"), "e2e")


def test_client_disconnect_frees_engine_request(agg_service):
    url, _ = agg_service
    body = {
        "model": "tiny",
        "prompt": PROMPTS[0],
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=30) as h, h.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    deadline = time.monotonic() + 10
    stats: list[dict] = []
    while time.monotonic() < deadline:
        stats = _worker_stats()
        if all(s["inflight"] == 0 and s["running"] == 0 for s in stats):
            break
        time.sleep(0.3)
    assert len(stats) == 2 and all(s["inflight"] == 0 and s["running"] == 0 for s in stats), stats


@pytest.mark.parametrize(
    "path,body,status,needle",
    [
        ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            404,
            "does not exist",
        ),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": list(range(1, 400)) * 12},
            400,
            "maximum context length",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        (
            "/v1/completions",
            {"model": "tiny", "prompt": "x", "max_tokens": 5000},
            400,
            "maximum context length",
        ),
        ("/v1/completions", {"model": "tiny", "prompt": [99999]}, 400, "out of range"),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "role",
        ),
    ],
)
def test_bad_input_gets_openai_error_and_service_keeps_serving(
    agg_service, client, path, body, status, needle
):
    url, _ = agg_service
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]
    ok = client.completions.create(model="tiny", prompt="the cat", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


def test_health_live_metrics(agg_service):
    url, _ = agg_service
    assert httpx.get(url + "/live").json()["status"] == "alive"
    h = httpx.get(url + "/health").json()
    assert h["status"] == "healthy" and h["models"] == ["tiny"]
    # A name no model has is counted under "unknown": labels must not grow with what clients send.
    bad = {"model": "no-such-model-7", "messages": [{"role": "user", "content": "x"}]}
    assert httpx.post(url + "/v1/chat/completions", json=bad).status_code == 404
    text = httpx.get(url + "/metrics").text
    assert 'dynvllm_requests_total{model="tiny",status="200"}' in text
    assert 'dynvllm_requests_total{model="unknown",status="404"}' in text
    assert "no-such-model-7" not in text
    assert "dynvllm_time_to_first_token_seconds_count" in text
    assert "dynvllm_inter_token_latency_seconds_count" in text
