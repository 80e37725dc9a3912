"""`dynvllm serve embed`: an embedding role ends the chain at its `embed` stage and `/v1/embeddings`
answers through the real `openai` client with the vectors the model computes."""

from __future__ import annotations

import base64
import struct

import httpx
import openai
import pytest

from tests.helpers import OfflineReference, start_agg, stop_in_background, wait_http

TEXTS = ["the cat sees a dog and", "red river runs where the old mountain"]


@pytest.fixture(scope="module")
def reference_job(tiny_model):
    """(token ids, the child computing vLLM's offline embedding of each text with
    `LLM(runner="pooling")` on the same model), started before the service so both engines start
    side by side."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = [tok(text)["input_ids"] for text in TEXTS]
    job = OfflineReference(tiny_model, ids, script="offline_pooling.py")
    yield ids, job
    job.close()


@pytest.fixture(scope="module")
def service(tiny_model, tmp_path_factory, reference_job):
    url, proc = start_agg(tiny_model, tmp_path_factory.mktemp("embed") / "serve.log", "emb", role="embed")
    try:
        wait_http(url + "/health", lambda b: b.get("workers") == 1, proc)
        yield url
    finally:
        stop_in_background([proc])


@pytest.fixture(scope="module")
def reference(reference_job):
    """(token ids, vLLM's offline embedding) of each text."""
    ids, job = reference_job
    return list(zip(ids, job.result(), strict=True))


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


def test_embeddings_are_the_models_vectors(service, reference):
    client = openai.OpenAI(base_url=service + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.embeddings.create(model="tiny", input=TEXTS)
    assert [d.index for d in r.data] == [0, 1]
    for d, (_ids, want) in zip(r.data, reference, strict=True):
        assert len(d.embedding) == len(want) == 128
        assert max(abs(a - b) for a, b in zip(d.embedding, want, strict=True)) < 1e-4
    assert _cos(r.data[0].embedding, r.data[1].embedding) < 0.9  # different texts, different vectors
    assert r.usage.prompt_tokens == sum(len(ids) for ids, _ in reference)
    # Token ids in, the same vector out; base64 is the same floats as float32.
    by_ids = client.embeddings.create(model="tiny", input=reference[0][0])
    assert _cos(by_ids.data[0].embedding, r.data[0].embedding) > 0.9999
    raw = httpx.post(
        service + "/v1/embeddings", json={"model": "tiny", "input": TEXTS[0], "encoding_format": "base64"}
    ).json()
    blob = base64.b64decode(raw["data"][0]["embedding"])
    floats = struct.unpack(f"<{len(blob) // 4}f", blob)
    assert max(abs(a - b) for a, b in zip(floats, r.data[0].embedding, strict=True)) < 1e-6


def test_a_model_that_only_embeds_refuses_to_generate_and_bad_input_is_named(service):
    r = httpx.post(
        service + "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 400 and "'generate'" in r.json()["error"]["message"]
    assert "embed" in r.json()["error"]["message"]
    r = httpx.post(service + "/v1/embeddings", json={"model": "tiny", "input": "x", "truncate": 3})
    assert r.status_code == 400 and "truncate" in r.json()["error"]["message"]
    r = httpx.post(service + "/v1/embeddings", json={"model": "tiny", "input": []})
    assert r.status_code == 400 and "input" in r.json()["error"]["message"]
    r = httpx.post(service + "/v1/embeddings", json={"model": "nope", "input": "x"})
    assert r.status_code == 404
    ok = httpx.post(service + "/v1/embeddings", json={"model": "tiny", "input": "still serving"})
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 128
