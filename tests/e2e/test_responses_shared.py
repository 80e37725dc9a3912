"""Stored responses across frontends of one namespace (sim engine, real NATS, the `openai` SDK):
a response made through frontend A is read, continued, cancelled, followed and deleted through
frontend B, and what becomes of a background run whose frontend stopped."""

from __future__ import annotations

import signal
import time

import openai
import pytest

from dynvllm.runtime import state
from tests.helpers import SIM, start_agg, start_service, stop_all, wait_workers

NS = "respshared"


@pytest.fixture(scope="module")
def frontends(tiny_model, tmp_path_factory):
    """`serve agg` with a sim worker (frontend A, 20 ms a token) and a `dynvllm frontend` (B)."""
    logs = tmp_path_factory.mktemp("respshared")
    _, a = start_agg(tiny_model, logs / "serve.log", NS, "--sim-decode-ms-per-step", "20", engine_args=SIM)
    procs = [a]
    try:
        wait_workers(a, 1, timeout=120)
        b = start_service(
            ["frontend"], logs / "b.log", namespace=NS, nats_url=state.resolve_nats_url(None, NS)
        )
        procs.append(b)
        wait_workers(b, 1, timeout=60)
        clients = [openai.OpenAI(base_url=p.url + "/v1", api_key="none", max_retries=0) for p in (a, b)]
        yield clients, procs
    finally:
        stop_all(procs)


def _respond(client: openai.OpenAI, **kw):
    return client.responses.create(model="tiny", temperature=0, **kw)


def test_a_response_made_on_one_frontend_is_read_continued_and_deleted_on_another(frontends):
    (a, b), _ = frontends
    r = _respond(a, input="the red mountain", max_output_tokens=6)
    assert r.output_text and r.usage.output_tokens == 6
    assert b.responses.retrieve(r.id).model_dump() == r.model_dump()
    more = _respond(b, input="and then", previous_response_id=r.id, max_output_tokens=4)
    # The second turn's prompt holds the first turn's input and output.
    assert more.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens
    assert a.responses.retrieve(more.id).model_dump() == more.model_dump()

    b.responses.delete(r.id)  # made on A, deleted through B: gone on both
    for client in (a, b):
        with pytest.raises(openai.NotFoundError) as exc:
            client.responses.retrieve(r.id)
        assert "any frontend process of this namespace" in exc.value.message
    with pytest.raises(openai.NotFoundError) as exc:
        _respond(b, input="x", previous_response_id=r.id, max_output_tokens=1)
    assert exc.value.body["param"] == "previous_response_id"
    a.responses.delete(more.id)
    with pytest.raises(openai.NotFoundError):
        b.responses.delete(more.id)
    with pytest.raises(openai.BadRequestError) as exc:
        b.responses.cancel(_respond(a, input="x", max_output_tokens=1).id)
    assert exc.value.message.endswith("Cannot cancel a synchronous response.")


def _polled(client: openai.OpenAI, rid: str, seen: set[str]):
    deadline = time.monotonic() + 60
    while (got := client.responses.retrieve(rid)).status in ("queued", "in_progress"):
        seen.add(got.status)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return got


def test_a_background_response_is_polled_cancelled_and_followed_on_another_frontend(frontends):
    (a, b), _ = frontends
    # Polled through B to the answer A made.
    r = _respond(a, input="the red mountain", max_output_tokens=12, background=True)
    assert r.status == "queued"
    seen: set[str] = set()
    got = _polled(b, r.id, seen)
    assert seen <= {"queued", "in_progress"} and got.status == "incomplete"
    assert got.usage.output_tokens == 12 and got.model_dump() == a.responses.retrieve(r.id).model_dump()
    with pytest.raises(openai.BadRequestError) as exc:
        b.responses.cancel(r.id)
    assert "already incomplete" in exc.value.message

    # Cancelled through B: A's run stops, both read it cancelled.
    long = _respond(a, input="go on", max_output_tokens=1000, background=True)
    time.sleep(0.3)
    assert b.responses.retrieve(long.id).status == "in_progress"
    with pytest.raises(openai.BadRequestError) as exc:
        _respond(b, input="x", previous_response_id=long.id, max_output_tokens=1)
    assert "still in_progress" in exc.value.message
    cancelled = b.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert a.responses.retrieve(long.id).status == "cancelled" == b.responses.retrieve(long.id).status

    # Streamed on A, followed through B from a sequence number: the same events.
    events = list(_respond(a, input="the red mountain", max_output_tokens=12, background=True, stream=True))
    rid = events[0].response.id
    again = list(b.responses.retrieve(rid, stream=True, starting_after=2))
    assert [e.model_dump() for e in again] == [e.model_dump() for e in events[3:]]
    assert events[-1].type == "response.incomplete"
    assert b.responses.retrieve(rid).output_text == events[-1].response.output_text == got.output_text


def test_a_run_whose_frontend_stopped_is_failed_or_cancelled_not_running(frontends):
    (a, b), procs = frontends
    running = [
        _respond(b, input="go on", max_output_tokens=1000, background=True, stream=s) for s in (False, True)
    ]
    rids = [running[0].id, next(iter(running[1])).response.id]
    time.sleep(0.3)
    procs[1].signal(signal.SIGKILL)  # B stops without a word
    procs[1].p.wait(30)
    polled = a.responses.retrieve(rids[0])
    assert polled.status == "failed" and "stopped" in polled.error.message
    with pytest.raises(openai.NotFoundError) as exc:
        list(a.responses.retrieve(rids[1], stream=True))
    assert "no longer has them" in exc.value.message
    assert a.responses.cancel(rids[1]).status == "cancelled"
    with pytest.raises(openai.BadRequestError) as exc:
        _respond(a, input="x", previous_response_id=rids[1], max_output_tokens=1)
    assert "no conversation to continue" in exc.value.message
