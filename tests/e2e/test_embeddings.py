"""`dynvllm serve embed`: an embedding role ends the chain at its `embed` stage and `/v1/embeddings`
answers through the real `openai` client with the vectors the model computes. A second embed
worker in the same service serves a tiny one-label sequence-classification model ("cls"): vLLM's
`/classify` answers with it, and so do `/score` and `/rerank` as with a cross-encoder."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import openai
import pytest

from tests.helpers import (
    ENGINE_ARGS,
    OfflineReference,
    start_agg,
    start_service,
    stop_in_background,
    wait_http,
)

TEXTS = ["the cat sees a dog and", "red river runs where the old mountain"]
QUERY = "the cat sees a dog"
DOCS = ["a dog sees the cat", "red river runs", "the old mountain road and the city", "cat and dog"]
#: (data_1, data_2) of the score requests: 1:N and N:N.
SCORES = [(QUERY, DOCS), (["one red fish", "big old tree"], ["red fish", "a new house"])]
#: A score template (the second frontend's --chat-template): vLLM renders each pair with it.
SCORE_TEMPLATE = (
    "{% if instruction %}<|im_start|>system\n{{ instruction }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
INSTRUCTION = "Is the document about the query?"
#: Inputs of /classify: sentences of different lengths and words, so their classes differ.
CLASSIFY = ["the cat sees a dog and", "red river runs where the old mountain", "one", "big old tree."]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny Qwen2ForSequenceClassification with one label (a cross-encoder), as
    `model tiny --classify --labels 1`."""
    from dynvllm.models.tiny import build_tiny_classifier

    return build_tiny_classifier(tmp_path_factory.mktemp("cls") / "model", labels=1)


@pytest.fixture(scope="module")
def reference_job(tiny_model, classifier):
    """(token ids, the child computing vLLM's offline embedding of each text and the scores of
    SCORES with `LLM(runner="pooling")` on the same model, then the classifier's probabilities of
    CLASSIFY with `LLM.classify` and its cross-encoder scores of SCORES with `LLM.score`), started
    before the service so the engines start side by side."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = [tok(text)["input_ids"] for text in TEXTS]
    scores = [{"score": [a, b]} for a, b in SCORES]
    cross = [{"cross_score": [str(classifier), a, b]} for a, b in SCORES]
    (q, docs), (left, right) = SCORES
    cross += [
        {"cross_score": [str(classifier), q, docs, SCORE_TEMPLATE, {"instruction": INSTRUCTION}]},
        {"cross_score": [str(classifier), left, right, SCORE_TEMPLATE, {}]},
    ]
    reqs = [*ids, *scores, *cross, {"classify": [str(classifier), CLASSIFY]}]
    job = OfflineReference(tiny_model, reqs, script="offline_pooling.py")
    yield ids, job
    job.close()


@pytest.fixture(scope="module")
def template_frontend(tmp_path_factory, nats_url):
    """A second frontend of the service with a --chat-template, which vLLM's server uses as the
    cross-encoder's score template (started first: it needs no engine)."""
    logs = tmp_path_factory.mktemp("embfe")
    (logs / "score.jinja").write_text(SCORE_TEMPLATE)
    fe = start_service(
        ["frontend"],
        logs / "fe.log",
        "--chat-template",
        str(logs / "score.jinja"),
        namespace="emb",
        nats_url=nats_url,
    )
    yield fe
    stop_in_background([fe])


@pytest.fixture(scope="module")
def service(tiny_model, classifier, tmp_path_factory, reference_job, nats_url, template_frontend):
    """The embedding model "tiny" and the classifier "cls", each on its embed worker, one frontend."""
    logs = tmp_path_factory.mktemp("embed")
    url, proc = start_agg(tiny_model, logs / "serve.log", "emb", "--nats-url", nats_url, role="embed")
    cls = start_service(
        ["serve", "embed", "--no-frontend"],
        logs / "cls.log",
        "--model",
        str(classifier),
        "--served-model-name",
        "cls",
        *ENGINE_ARGS,
        namespace="emb",
        nats_url=nats_url,
        http=False,
    )
    try:
        wait_http(url + "/health", lambda b: b.get("workers") == 2, proc, timeout=400)
        yield url
    finally:
        stop_in_background([proc, cls])


@pytest.fixture(scope="module")
def reference(reference_job):
    """(token ids, vLLM's offline embedding) of each text."""
    ids, job = reference_job
    return list(zip(ids, job.result()[: len(ids)], strict=True))


@pytest.fixture(scope="module")
def score_reference(reference_job) -> list[list[float]]:
    """vLLM's offline scores (`LLM.score`) of each pair of SCORES."""
    ids, job = reference_job
    return job.result()[len(ids) : len(ids) + len(SCORES)]


@pytest.fixture(scope="module")
def cross_reference(reference_job) -> list[list[float]]:
    """vLLM's offline scores (`LLM.score`) of each pair of SCORES by the one-label classifier."""
    ids, job = reference_job
    start = len(ids) + len(SCORES)
    return job.result()[start : start + 2 * len(SCORES)]


@pytest.fixture(scope="module")
def classify_reference(reference_job) -> list[list[float]]:
    """vLLM's offline class probabilities (`LLM.classify`) of each CLASSIFY input."""
    _ids, job = reference_job
    return job.result()[-1]


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


def test_embeddings_are_the_models_vectors(service, reference):
    client = openai.OpenAI(base_url=service + "/v1", api_key="none", max_retries=0)
    assert sorted(m.id for m in client.models.list().data) == ["cls", "tiny"]
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


def _tokens(tiny_model, texts: list[str]) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return sum(len(tok(t)["input_ids"]) for t in texts)


def test_score_and_rerank_are_vllms_cosine_scores(service, score_reference, tiny_model):
    (want_1n, want_nn) = score_reference
    assert len(want_1n) == len(DOCS) and len(set(want_1n)) == len(DOCS)  # the scores tell docs apart
    r = httpx.post(service + "/score", json={"model": "tiny", "queries": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("score-") and body["object"] == "list" and body["model"] == "tiny"
    assert [d["index"] for d in body["data"]] == list(range(len(DOCS)))
    assert {d["object"] for d in body["data"]} == {"score"}
    assert max(abs(d["score"] - w) for d, w in zip(body["data"], want_1n, strict=True)) < 1e-4
    # The query is embedded once, as vLLM counts it.
    assert (
        body["usage"]["prompt_tokens"] == _tokens(tiny_model, [QUERY, *DOCS]) == body["usage"]["total_tokens"]
    )
    # N:N under vLLM's older spelling, at /v1/score.
    left, right = SCORES[1]
    nn = httpx.post(service + "/v1/score", json={"model": "tiny", "text_1": left, "text_2": right}).json()
    assert max(abs(d["score"] - w) for d, w in zip(nn["data"], want_nn, strict=True)) < 1e-4
    # Rerank: the same scores, documents by relevance, top_n of them.
    order = sorted(range(len(DOCS)), key=lambda i: want_1n[i], reverse=True)
    for route in ("/rerank", "/v1/rerank", "/v2/rerank"):
        rr = httpx.post(
            service + route, json={"model": "tiny", "query": QUERY, "documents": DOCS, "top_n": 2}
        )
        assert rr.status_code == 200, rr.text
        results = rr.json()["results"]
        assert [x["index"] for x in results] == order[:2]
        assert [x["document"]["text"] for x in results] == [DOCS[i] for i in order[:2]]
        assert max(abs(x["relevance_score"] - want_1n[x["index"]]) for x in results) < 1e-4
    every = httpx.post(service + "/rerank", json={"model": "tiny", "query": QUERY, "documents": DOCS}).json()
    assert [x["index"] for x in every["results"]] == order
    assert every["usage"]["prompt_tokens"] == body["usage"]["prompt_tokens"]


def test_pooling_answers_the_embedding_and_what_is_not_served_is_named(service, reference):
    ids, want = reference[0]
    r = httpx.post(service + "/pooling", json={"model": "tiny", "input": TEXTS[0]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("pooling-") and body["data"][0]["object"] == "pooling"
    assert max(abs(a - b) for a, b in zip(body["data"][0]["data"], want, strict=True)) < 1e-4
    assert body["usage"]["prompt_tokens"] == len(ids)
    by_ids = httpx.post(
        service + "/pooling",
        json={"model": "tiny", "input": ids, "task": "embed", "encoding_format": "base64"},
    )
    blob = base64.b64decode(by_ids.json()["data"][0]["data"])
    assert (
        max(abs(a - b) for a, b in zip(struct.unpack(f"<{len(blob) // 4}f", blob), want, strict=True)) < 1e-4
    )

    def refused(route: str, body: dict, status: int = 400) -> str:
        r = httpx.post(service + route, json=body)
        assert r.status_code == status, (route, body, r.text)
        return r.json()["error"]["message"]

    msg = refused("/classify", {"model": "tiny", "input": "hi"}, 501)
    assert "Classification API" in msg and "ForSequenceClassification" in msg
    assert "dimensions" in refused("/pooling", {"model": "tiny", "input": "x", "dimensions": 8})
    assert "'classify'" in refused("/pooling", {"model": "tiny", "input": "x", "task": "classify"})
    assert "messages" in refused(
        "/pooling", {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}
    )
    assert "1:1, 1:N or N:N" in refused("/score", {"model": "tiny", "queries": ["a", "b"], "documents": DOCS})
    assert "instruction" in refused(
        "/rerank", {"model": "tiny", "query": "a", "documents": DOCS, "instruction": "x"}
    )
    assert "max_tokens_per_doc" in refused(
        "/score", {"model": "tiny", "text_1": "a", "text_2": "b", "max_tokens_per_doc": 3}
    )
    # vLLM's server serves one model and lets a request leave it out; with two, it is named.
    assert "model is required" in refused("/score", {"text_1": "a", "text_2": "b"})
    assert "queries/documents" in refused("/score", {"model": "tiny", "queries": "a"})
    assert refused("/score", {"model": "nope", "text_1": "a", "text_2": "b"}, 404)
    ok = httpx.post(service + "/score", json={"model": "tiny", "text_1": "a", "text_2": "a"})
    assert ok.status_code == 200 and abs(ok.json()["data"][0]["score"] - 1.0) < 1e-5


def test_classify_answers_vllms_probabilities_and_labels(service, classify_reference, tiny_model):
    from dynvllm.models.tiny import CROSS_ENCODER_LABEL

    r = httpx.post(service + "/classify", json={"model": "cls", "input": CLASSIFY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("classify-") and body["object"] == "list" and body["model"] == "cls"
    assert [d["index"] for d in body["data"]] == list(range(len(CLASSIFY)))
    for d, want in zip(body["data"], classify_reference, strict=True):
        # One label: vLLM's activation is a sigmoid, so the one probability is not 1.
        assert d["num_classes"] == len(d["probs"]) == len(want) == 1 and 0.05 < want[0] < 0.95
        assert abs(d["probs"][0] - want[0]) < 1e-4
        assert d["label"] == CROSS_ENCODER_LABEL
    # the inputs are told apart: not one answer for all
    assert len({round(w[0], 3) for w in classify_reference}) == len(CLASSIFY)
    assert body["usage"]["prompt_tokens"] == _tokens(tiny_model, CLASSIFY) == body["usage"]["total_tokens"]
    # Token ids in, the same probabilities out (the two models share the tokenizer).
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model)(CLASSIFY[0])["input_ids"]
    again = httpx.post(service + "/classify", json={"model": "cls", "input": ids}).json()["data"][0]
    assert abs(again["probs"][0] - classify_reference[0][0]) < 1e-4
    # The classifier does not embed; the embedding model refuses /classify (vLLM's words).
    bad = httpx.post(service + "/pooling", json={"model": "cls", "input": "x"})
    assert bad.status_code == 400 and "classification model" in bad.json()["error"]["message"], bad.text
    no = httpx.post(service + "/classify", json={"model": "tiny", "input": "x"})
    assert no.status_code == 501 and "Classification API" in no.json()["error"]["message"]


def _pair_tokens(tiny_model, pairs: list[tuple[str, str]]) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return sum(len(tok(q, text_pair=d)["input_ids"]) for q, d in pairs)


def test_a_cross_encoder_scores_pairs_as_vllm(service, cross_reference, score_reference, tiny_model):
    """The one-label classifier scores each (query, document) pair tokenized together, as vLLM's
    server and `LLM.score` do: the same scores within 1e-4, rerank order, top_n, usage."""
    (want_1n, want_nn) = cross_reference[:2]
    assert len({round(w, 3) for w in want_1n}) == len(DOCS)  # the scores tell the documents apart
    # Not the embedding model's cosines: the cross-encoder reads the pair.
    assert max(abs(a - b) for a, b in zip(want_1n, score_reference[0], strict=True)) > 0.05
    r = httpx.post(service + "/score", json={"model": "cls", "queries": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("score-") and body["object"] == "list" and body["model"] == "cls"
    assert [(d["index"], d["object"]) for d in body["data"]] == [(i, "score") for i in range(len(DOCS))]
    assert max(abs(d["score"] - w) for d, w in zip(body["data"], want_1n, strict=True)) < 1e-4
    # Each pair is one prompt: the query counts once per document, as vLLM counts it.
    tokens = _pair_tokens(tiny_model, [(QUERY, d) for d in DOCS])
    assert body["usage"]["prompt_tokens"] == tokens == body["usage"]["total_tokens"]
    left, right = SCORES[1]
    nn = httpx.post(service + "/v1/score", json={"model": "cls", "text_1": left, "text_2": right})
    assert nn.status_code == 200, nn.text
    assert max(abs(d["score"] - w) for d, w in zip(nn.json()["data"], want_nn, strict=True)) < 1e-4
    assert nn.json()["usage"]["prompt_tokens"] == _pair_tokens(
        tiny_model, list(zip(left, right, strict=True))
    )
    # use_activation false: the raw logit, whose sigmoid is the score.
    raw = httpx.post(
        service + "/score", json={"model": "cls", "data_1": QUERY, "data_2": DOCS[0], "use_activation": False}
    ).json()["data"][0]["score"]
    assert abs(1 / (1 + math.exp(-raw)) - want_1n[0]) < 1e-4 and abs(raw) > 1e-3
    order = sorted(range(len(DOCS)), key=lambda i: want_1n[i], reverse=True)
    for route in ("/rerank", "/v1/rerank", "/v2/rerank"):
        rr = httpx.post(service + route, json={"model": "cls", "query": QUERY, "documents": DOCS, "top_n": 3})
        assert rr.status_code == 200, rr.text
        results = rr.json()["results"]
        assert [x["index"] for x in results] == order[:3]
        assert [x["document"]["text"] for x in results] == [DOCS[i] for i in order[:3]]
        assert max(abs(x["relevance_score"] - want_1n[x["index"]]) for x in results) < 1e-4
        assert rr.json()["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    every = httpx.post(service + "/rerank", json={"model": "cls", "query": QUERY, "documents": DOCS}).json()
    assert [x["index"] for x in every["results"]] == order
    # Bad requests are named; the service keeps scoring.
    for req, named in (
        ({"queries": ["a", "b"], "documents": DOCS}, "1:1, 1:N or N:N"),
        ({"queries": "a", "documents": []}, "text_pair"),
        ({"query": "a", "documents": DOCS, "instruction": "x"}, "instruction"),
        ({"query": "a", "documents": DOCS, "truncate_prompt_tokens": 4}, "truncate_prompt_tokens"),
        ({"query": "a", "documents": DOCS, "top_n": -1}, "top_n"),
    ):
        route = "/rerank" if "query" in req else "/score"
        bad = httpx.post(service + route, json={"model": "cls", **req})
        assert bad.status_code == 400 and named in bad.json()["error"]["message"], (req, bad.text)
    again = httpx.post(service + "/score", json={"model": "cls", "queries": QUERY, "documents": DOCS[:1]})
    assert again.status_code == 200 and abs(again.json()["data"][0]["score"] - want_1n[0]) < 1e-4


def test_a_cross_encoder_under_a_score_template_renders_each_pair(
    service, template_frontend, cross_reference, tiny_model
):
    """With the service's --chat-template, each pair is the template's text for the messages
    query and document (with `instruction`), as vLLM's server and `LLM.score(chat_template=...)`."""
    from transformers import AutoTokenizer

    wait_http(
        template_frontend.url + "/health", lambda b: b.get("workers") == 2, template_frontend, timeout=60
    )
    plain_1n, plain_nn, want_1n, want_nn = cross_reference
    # the template counts: no score is the plain pair's
    assert min(abs(a - b) for a, b in zip([*want_1n, *want_nn], [*plain_1n, *plain_nn], strict=True)) > 1e-3
    url = template_frontend.url
    r = httpx.post(
        url + "/score", json={"model": "cls", "queries": QUERY, "documents": DOCS, "instruction": INSTRUCTION}
    )
    assert r.status_code == 200, r.text
    assert max(abs(d["score"] - w) for d, w in zip(r.json()["data"], want_1n, strict=True)) < 1e-4
    tok = AutoTokenizer.from_pretrained(tiny_model)
    messages = [[{"role": "query", "content": QUERY}, {"role": "document", "content": d}] for d in DOCS]
    texts = [
        tok.apply_chat_template(m, chat_template=SCORE_TEMPLATE, tokenize=False, instruction=INSTRUCTION)
        for m in messages
    ]
    assert r.json()["usage"]["prompt_tokens"] == sum(len(tok(t)["input_ids"]) for t in texts)
    left, right = SCORES[1]
    rr = httpx.post(url + "/v1/rerank", json={"model": "cls", "query": left[0], "documents": right[:1]})
    assert rr.status_code == 200 and abs(rr.json()["results"][0]["relevance_score"] - want_nn[0]) < 1e-4
    nn = httpx.post(url + "/score", json={"model": "cls", "text_1": left, "text_2": right}).json()
    assert max(abs(d["score"] - w) for d, w in zip(nn["data"], want_nn, strict=True)) < 1e-4
    bad = httpx.post(
        url + "/rerank",
        json={"model": "cls", "query": "a", "documents": DOCS, "chat_template_kwargs": {"tokenize": True}},
    )
    assert bad.status_code == 400 and "reserved keys" in bad.json()["error"]["message"]
    # The embedding model scores by cosine there too: the template is a cross-encoder's only.
    cos = httpx.post(url + "/score", json={"model": "tiny", "text_1": "a", "text_2": "a"})
    assert cos.status_code == 200 and abs(cos.json()["data"][0]["score"] - 1.0) < 1e-5
