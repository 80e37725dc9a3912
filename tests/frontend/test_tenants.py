"""Tenants' limits (pure): the file's checks, token buckets, admission and its refusals."""

from __future__ import annotations

import hashlib

import pytest

from dynvllm.frontend.tenants import Limits, TokenBucket, parse

LIGHT = hashlib.sha256(b"k-light").hexdigest()
FILE = f"""
tenants:
  heavy:
    keys: [k-heavy]
    requests_per_second: 2
    tokens_per_minute: 600
    max_concurrent: 3
  light:
    keys: ["sha256:{LIGHT}"]
    models: ["tiny", "qwen-*"]
"""


def test_parse_reads_yaml_and_json_and_maps_keys_and_digests():
    specs = parse(FILE)
    assert sorted(specs) == ["heavy", "light"]
    limits = Limits(specs, 0.0)
    assert limits.tenant_of(b"k-heavy") == "heavy"
    assert limits.tenant_of(b"k-light") == "light"  # given as its SHA-256 in the file
    assert limits.tenant_of(b"k-other") is None and limits.tenant_of(None) is None
    as_json = parse('{"tenants": {"a": {"keys": ["x"], "max_concurrent": 1}}}', json_syntax=True)
    assert as_json["a"].max_concurrent == 1


@pytest.mark.parametrize(
    "text,message",
    [
        ("tenants: {a: {keys: []}}", "tenants.a.keys"),
        ("tenants: {a: {keys: [x], requests_per_second: 0}}", "requests_per_second"),
        ("tenants: {a: {keys: [x], rps: 3}}", "tenants.a.rps"),
        ("tenants: {a: {keys: [x]}, b: {keys: [x]}}", "also a key of tenant 'a'"),
        ("tenants: {'a b': {keys: [x]}}", "tenant name 'a b'"),
        ("tenants: {a: {keys: ['sha256:12']}}", "64 hex digits"),
        ("tenants: [", "not valid YAML"),
        ("[1, 2]", "the file"),
    ],
)
def test_parse_names_what_is_wrong(text, message):
    with pytest.raises(ValueError) as info:
        parse(text)
    assert message in str(info.value)


def test_token_bucket_refills_at_its_rate_and_may_owe():
    b = TokenBucket.full(rate=2.0, capacity=4.0, now=0.0)
    assert b.wait(4, 0.0) == 0.0
    b.take(4, 0.0)
    assert b.wait(1, 0.0) == pytest.approx(0.5)
    assert b.wait(1, 0.5) == 0.0
    b.take(10, 0.5)  # completion tokens known late: a debt
    assert b.level == pytest.approx(-9.0)
    assert b.wait(1, 0.5) == pytest.approx(5.0)
    assert b.wait(100, 0.5) == pytest.approx(6.5)  # more than the capacity needs a full bucket
    b.refill(100.0)
    assert b.level == 4.0


def test_requests_per_second_refuses_with_the_time_to_wait():
    limits = Limits(parse(FILE), 0.0)
    assert limits.admit("heavy", 1, "tiny", "tiny", 10, 0.0) is None
    limits.finish("heavy", 1, 0, True, 0.0)
    assert limits.admit("heavy", 2, "tiny", "tiny", 10, 0.0) is None  # burst = rps = 2
    limits.finish("heavy", 2, 0, True, 0.0)
    refusal = limits.admit("heavy", 3, "tiny", "tiny", 10, 0.0)
    assert refusal is not None and refusal.reason == "requests"
    assert refusal.retry_after == pytest.approx(0.5) and "requests per second" in refusal.message
    assert limits.admit("heavy", 3, "tiny", "tiny", 10, 0.5) is None


def test_tokens_per_minute_charges_prompts_then_completions():
    limits = Limits(parse(FILE), 0.0)  # 600 tokens a minute: 10 a second
    assert limits.admit("heavy", 1, "tiny", None, 500, 0.0) is None
    limits.finish("heavy", 1, 200, True, 0.0)  # 700 charged: 100 owed
    refusal = limits.admit("heavy", 2, "tiny", None, 50, 10.0)  # refilled 100: back at 0
    assert refusal is not None and refusal.reason == "tokens"
    assert refusal.retry_after == pytest.approx(5.0)
    assert limits.admit("heavy", 2, "tiny", None, 50, 15.0) is None


def test_concurrency_and_models_and_refunds():
    limits = Limits(parse(FILE), 0.0)
    for t in range(3):
        assert limits.admit("heavy", t, "tiny", None, 1, float(t)) is None
    refusal = limits.admit("heavy", 9, "tiny", None, 1, 10.0)
    assert refusal is not None and refusal.reason == "concurrency"
    limits.finish("heavy", 0, 0, True, 10.0)
    assert limits.admit("heavy", 9, "tiny", None, 1, 10.0) is None
    # Models: the name asked for or, for an alias, the model it names; shell patterns.
    assert limits.admit("light", 1, "qwen-7b", None, 1, 0.0) is None
    assert limits.admit("light", 2, "t", "tiny", 1, 0.0) is None
    refusal = limits.admit("light", 3, "other", "other", 1, 0.0)
    assert refusal is not None and refusal.reason == "model" and "do not have access" in refusal.message
    # A request refused after the check (queue full) is given back what it was charged.
    limits.finish("heavy", 1, 0, True, 10.0)
    state = limits.states["heavy"]
    assert state.requests is not None and state.tokens is not None
    assert limits.admit("heavy", 20, "tiny", None, 7, 10.0) is None
    assert state.requests.level == pytest.approx(0.0) and state.inflight == 3  # 9 took one too
    tokens = state.tokens.level
    limits.finish("heavy", 20, 0, False, 10.0)
    assert state.requests.level == pytest.approx(1.0)
    assert state.tokens.level == pytest.approx(min(600, tokens + 7)) and state.inflight == 2


def test_unknown_tenant_or_ticket_is_ignored():
    limits = Limits(parse(FILE), 0.0)
    assert limits.admit("nobody", 1, "tiny", None, 1, 0.0) is None
    limits.finish("nobody", 1, 5, True, 0.0)
    limits.finish("heavy", 99, 5, True, 0.0)
    assert limits.states["heavy"].inflight == 0


def test_reload_keeps_what_stays_and_drops_what_goes():
    limits = Limits(parse(FILE), 0.0)
    assert limits.admit("heavy", 1, "tiny", None, 100, 0.0) is None
    specs = parse("tenants: {heavy: {keys: [k-new], tokens_per_minute: 300, max_concurrent: 1}}")
    limits.update(specs, 0.0)
    assert limits.tenant_of(b"k-heavy") is None and limits.tenant_of(b"k-new") == "heavy"
    assert "light" not in limits.states
    state = limits.states["heavy"]
    assert state.inflight == 1 and state.requests is None  # no request rate any more
    assert state.tokens is not None and state.tokens.level == pytest.approx(300)  # clamped to the new cap
    refusal = limits.admit("heavy", 2, "tiny", None, 1, 0.0)
    assert refusal is not None and refusal.reason == "concurrency"  # the in-flight one still counts
    limits.finish("heavy", 1, 0, True, 0.0)
    assert limits.admit("heavy", 2, "tiny", None, 1, 0.0) is None
