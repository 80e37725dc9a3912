"""Tenants on the request path: keys in each surface's scheme, 429s in each surface's shape with
Retry-After, the file reloaded when it changes, per-tenant metrics."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest

from dynvllm.frontend.errors import RequestError
from dynvllm.frontend.metrics import FrontendMetrics
from dynvllm.frontend.postprocess import Usage
from dynvllm.frontend.surface import Surface
from dynvllm.frontend.tenancy import Tenants
from dynvllm.settings import Settings
from dynvllm_plugins.surfaces.anthropic import AnthropicSurface

SETTINGS = Settings()
FILE = "tenants:\n  acme:\n    keys: [k-acme]\n    requests_per_second: 1\n    models: [tiny]\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(headers: dict[str, str], model: str = "tiny", refused: bool = False, completion: int = 0):
    r = SimpleNamespace(
        client=headers,
        parts=[SimpleNamespace(prompt_ids=[1, 2, 3])],
        model=model,
        entry=SimpleNamespace(name=model),
        dispatch=SimpleNamespace(lora=None),
        notes={},
        refused=refused,
    )
    r.usage = lambda: Usage(prompt_tokens=3, completion_tokens=completion)
    return r


@pytest.fixture
def setup(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text(FILE)
    clock = Clock()
    metrics = FrontendMetrics()
    surfaces = [Surface(None, SETTINGS), AnthropicSurface(None, SETTINGS)]  # type: ignore[arg-type]
    return Tenants(path, surfaces, metrics, clock), path, clock, metrics, surfaces


async def test_keys_in_either_scheme_map_to_the_tenant_and_its_limit_refuses(setup):
    tenants, _, clock, metrics, surfaces = setup
    first = request({"authorization": "Bearer k-acme"})
    await tenants.admit(first)
    assert first.notes["tenant"] == "acme"
    with pytest.raises(RequestError) as info:
        await tenants.admit(request({"x-api-key": "k-acme"}))  # Anthropic's scheme, same tenant
    err = info.value
    assert err.status == 429 and err.headers == {"retry-after": "1"}
    openai_body = json.loads(surfaces[0].error_response(err).body)["error"]
    assert (openai_body["type"], openai_body["code"]) == ("requests", "rate_limit_exceeded")
    anthropic = surfaces[1].error_response(err)
    assert anthropic.status_code == 429 and anthropic.headers["retry-after"] == "1"
    assert json.loads(anthropic.body)["error"]["type"] == "rate_limit_error"
    tenants.end(first, "200")
    clock.now += 1.0
    again = request({"authorization": "Bearer k-acme"}, completion=4)
    await tenants.admit(again)
    tenants.end(again, "200")
    # A key of --api-key (no tenant) passes untouched; a model outside the list is a 404.
    free = request({"authorization": "Bearer operator"})
    await tenants.admit(free)
    assert free.notes["tenant"] == "-"
    clock.now += 1.0
    with pytest.raises(RequestError) as info:
        await tenants.admit(request({"authorization": "Bearer k-acme"}, model="big"))
    assert info.value.status == 404 and info.value.code == "model_not_found"
    text = generate_latest(metrics.registry).decode()
    assert 'dynvllm_tenant_requests_total{status="200",tenant="acme"} 2.0' in text
    assert 'dynvllm_tenant_refusals_total{reason="requests",tenant="acme"} 1.0' in text
    assert 'dynvllm_tenant_refusals_total{reason="model",tenant="acme"} 1.0' in text
    assert 'dynvllm_tenant_tokens_total{kind="prompt",tenant="acme"} 6.0' in text
    assert 'dynvllm_tenant_tokens_total{kind="completion",tenant="acme"} 4.0' in text
    assert 'dynvllm_tenant_inflight_requests{tenant="acme"} 0.0' in text


async def test_a_request_refused_later_is_given_back_its_charge(setup):
    tenants, *_ = setup
    r = request({"authorization": "Bearer k-acme"})
    await tenants.admit(r)
    r.refused = True  # e.g. the admission queue was full
    tenants.end(r, "503")
    await tenants.admit(request({"authorization": "Bearer k-acme"}))  # its request was refunded


async def test_the_file_is_reloaded_when_it_changes_and_a_bad_one_is_ignored(setup, caplog):
    tenants, path, clock, *_ = setup
    assert tenants.accepts(b"k-acme") and not tenants.accepts(b"k-new") and not tenants.accepts(None)
    path.write_text(FILE.replace("k-acme", "k-new"))
    os.utime(path, (1, 1))
    assert tenants.accepts(b"k-acme")  # checked at most once a second
    clock.now += 1.0
    assert tenants.accepts(b"k-new") and not tenants.accepts(b"k-acme")
    path.write_text("tenants: {acme: {keys: []}}")
    os.utime(path, (2, 2))
    clock.now += 1.0
    assert tenants.accepts(b"k-new")  # the bad file is logged, the limits in force stay
    assert "tenants.acme.keys" in caplog.text and "keeping the tenants loaded before" in caplog.text


def test_a_bad_file_at_start_names_the_file(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"tenants": {"a": {"keys": ["x"], "max_concurrent": 0}}}')
    with pytest.raises(ValueError) as info:
        Tenants(path, [], FrontendMetrics())
    assert str(path) in str(info.value) and "max_concurrent" in str(info.value)
    with pytest.raises(ValueError, match="No such file"):
        Tenants(tmp_path / "nope.yaml", [], FrontendMetrics())
