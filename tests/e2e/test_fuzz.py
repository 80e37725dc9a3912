"""Property-based fuzzing of every HTTP route (hypothesis): hostile bodies, wrong types, huge
numbers, deep nesting, invalid UTF-8. No 5xx, every error is an OpenAI-shaped JSON body, no engine
request is left running, and the service keeps serving. Runs on a sim worker (the frontend is
the code under test; the engine only has to answer)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import SIM, start_agg, wait_http

ADMIN = "fuzz-admin"
POST_ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/tokenize",
    "/detokenize",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/clear_kv_blocks",
]
GET_ROUTES = ["/v1/models", "/v1/models/tiny", "/v1/models/%00..%2F", "/health", "/live", "/version"]
SENT: dict[str, int] = {"count": 0}


@pytest.fixture(scope="module")
def service(tiny_model, tmp_path_factory):
    url, proc = start_agg(
        tiny_model,
        tmp_path_factory.mktemp("fuzz") / "serve.log",
        "fuzz",
        "--admin-token",
        ADMIN,
        "--sim-decode-ms-per-step",
        "0.2",
        "--sim-prefill-us-per-token",
        "1",
        engine_args=SIM,
    )
    try:
        wait_http(url + "/health", lambda b: b.get("workers") == 1, proc, timeout=120)
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, proc
    finally:
        proc.stop()


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
)
_json = st.recursive(
    _scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
_FIELDS = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "echo",
    "logit_bias",
    "response_format",
    "tools",
    "tool_choice",
    "seed",
    "tokens",
    "lora_name",
    "lora_path",
    "prompt_logprobs",
    "structured_outputs",
    "min_tokens",
    "stop_token_ids",
]


def _base(route: str) -> dict:
    if route == "/v1/chat/completions":
        return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    if route == "/detokenize":
        return {"model": "tiny", "tokens": [5, 6, 7]}
    if "lora" in route:
        return {"lora_name": "a", "lora_path": "/nonexistent"}
    return {"model": "tiny", "prompt": "hi", "max_tokens": 4}


@st.composite
def _mutated(draw, route: str) -> bytes:
    """A valid request with some fields replaced by arbitrary JSON (wrong types, huge numbers)."""
    body = _base(route)
    for name in draw(st.lists(st.sampled_from(_FIELDS), min_size=1, max_size=4, unique=True)):
        body[name] = draw(_json)
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 64:
        body["max_tokens"] = 64  # huge values are drawn elsewhere; keep valid ones quick
    return json.dumps(body).encode()


def _deep(depth: int, kind: str) -> bytes:
    inner = "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth
    return ('{"model": "tiny", "prompt": "x", "max_tokens": 2, "n": ' + inner + "}").encode()


_bodies = st.one_of(
    st.binary(max_size=64),  # arbitrary bytes: invalid UTF-8, truncated JSON, nothing at all
    _json.map(lambda v: json.dumps(v).encode()),
    st.sampled_from(POST_ROUTES[:4]).flatmap(_mutated),
    st.builds(_deep, st.sampled_from([50, 2000, 100000]), st.sampled_from(["list", "dict"])),
    st.sampled_from(
        [
            b'{"model": "tiny", "prompt": "\xff\xfe bad utf-8", "max_tokens": 2}',
            b'{"model": "tiny", "prompt": "x", "max_tokens": 1e400}',
            b'{"model": "tiny", "prompt": "x", "max_tokens": 99999999999999999999999999999}',
            b'{"model": "tiny", "prompt": [[1, 2], [99999999999]], "max_tokens": 2}',
            b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}',
            b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text"}]}]}',
            b"[]",
            b"null",
        ]
    ),
)


def _check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.request.url, r.request.content[:300], r.text[:300])
    if r.status_code >= 400:
        body = r.json()  # JSON, never a bare text page
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
        assert isinstance(body["error"]["type"], str), body


@settings(
    max_examples=1100,
    deadline=None,
    database=None,
    derandomize=True,  # the same 1,100 requests every run
    suppress_health_check=list(HealthCheck),
)
@given(
    route=st.sampled_from(POST_ROUTES),
    body=_bodies,
    admin=st.booleans(),
    content_type=st.sampled_from(["application/json", "text/plain", None]),
)
def test_every_route_answers_hostile_bodies_with_openai_errors(service, route, body, admin, content_type):
    client, _ = service
    headers = {}
    if admin:
        headers["Authorization"] = f"Bearer {ADMIN}"
    if content_type:
        headers["Content-Type"] = content_type
    with client.stream("POST", route, content=body, headers=headers) as r:
        r.read()  # a stream that started must also end cleanly
    SENT["count"] += 1
    SENT[str(r.status_code)] = SENT.get(str(r.status_code), 0) + 1
    _check(r)


@settings(
    max_examples=60, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(route=st.sampled_from(GET_ROUTES), query=st.text(max_size=30))
def test_get_routes_with_odd_queries(service, route, query):
    client, _ = service
    r = client.get(route, params={"q": query, "model": query})
    SENT["count"] += 1
    assert r.status_code < 500 and (r.status_code != 404 or r.json()["error"]["message"])


def test_after_the_fuzz_nothing_leaked_and_the_service_serves(service):
    client, proc = service
    assert SENT["count"] >= 1000
    print(f"\nfuzz: {SENT}")
    # Both paths were exercised. The bodies are the same every run but not every answer is:
    # 42 to 50+ of them were 200s in runs of the same code.
    assert SENT.get("200", 0) >= 30 and SENT.get("400", 0) >= 200
    from dynvllm.cli.status import collect
    from dynvllm.runtime import nats as natsrt
    from dynvllm.runtime import state
    from dynvllm.settings import build_settings

    settings_ = build_settings(
        {"runtime": {"nats_url": state.resolve_nats_url(None, "fuzz"), "namespace": "fuzz"}}
    )
    deadline = time.monotonic() + 10
    while True:
        rows = natsrt.run(collect(settings_, wait=0.6))
        load = [r["load"] for r in rows if r["component"] == "worker"]
        if load and all(ld.get("running") == 0 and ld.get("waiting") == 0 for ld in load):
            break
        assert time.monotonic() < deadline, load  # an engine request outlived its HTTP request
        time.sleep(0.5)
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "still here", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert proc.p.poll() is None
