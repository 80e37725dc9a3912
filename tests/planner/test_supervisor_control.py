"""The supervisor's control requests: parsing, and scaling a role's slots (processes faked)."""

from __future__ import annotations

import concurrent.futures
import itertools
import signal
from types import SimpleNamespace

import pytest

from dynvllm.settings import build_settings
from dynvllm.supervisor import Service
from dynvllm.supervisor_control import ControlError, ScaleRequest, WorkersRequest, parse

_pids = itertools.count(1000)


class FakeProc:
    def __init__(self) -> None:
        self.pid = next(_pids)
        self.code: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.code

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)


@pytest.fixture
def service(monkeypatch):
    svc = Service(build_settings(), [("agg", 2)], with_frontend=False)
    monkeypatch.setattr(svc, "_spawn", lambda slot: setattr(slot, "proc", FakeProc()))
    for t in (1.0, 2.0):
        svc._add_worker("agg", t)
    return svc


def test_parse_checks_op_fields_and_token():
    assert parse({"op": "scale", "role": "agg", "count": 2, "drain": [5]}, None) == ScaleRequest(
        "agg", 2, (5,)
    )
    assert parse({"op": "workers", "admin_token": "s"}, "s") == WorkersRequest()
    for bad, why in [
        ({"op": "scale", "role": "agg", "count": -1}, "between 0 and 256"),
        ({"op": "scale", "count": 1}, "needs a 'role'"),
        ({"op": "scale", "role": "agg", "count": 1, "drain": ["x"]}, "pids"),
        ({"op": "reboot"}, "unknown op"),
        ([1], "a map"),
    ]:
        with pytest.raises(ControlError, match=why):
            parse(bad, None)
    with pytest.raises(ControlError, match="admin-token"):
        parse({"op": "workers", "admin_token": "wrong"}, "s")


def test_scale_up_starts_and_scale_down_drains_the_named_worker_first(service):
    older, younger = service.workers
    answer = service.scale(ScaleRequest("agg", 3))
    assert len(answer["started"]) == 1 and answer["draining"] == []
    assert service.worker_pids()["workers"]["agg"] == [older.proc.pid, younger.proc.pid, answer["started"][0]]
    answer = service.scale(ScaleRequest("agg", 1, drain=(older.proc.pid,)))
    # The named one, then the youngest: never killed, asked to drain.
    assert answer["draining"] == [older.proc.pid, service.workers[2].proc.pid]
    assert older.proc.signals == [signal.SIGTERM] and younger.proc.signals == []
    assert service.worker_pids() == {
        "workers": {"agg": [younger.proc.pid]},
        "draining": answer["draining"],
    }


def test_an_unknown_role_is_refused_in_the_answer(service):
    future: concurrent.futures.Future = concurrent.futures.Future()
    service.control = SimpleNamespace(pending=lambda: [(ScaleRequest("nope", 1), future)])
    service._answer_control()
    assert "no role 'nope'; installed: " in future.result()["error"] and len(service.workers) == 2


def test_a_drained_worker_is_dropped_not_restarted_and_zero_is_not_fatal(service):
    service.scale(ScaleRequest("agg", 0))
    for s in service.workers:
        s.proc.code = 1  # even an unclean exit after a drain request is not restarted
    lines = service.supervise()
    assert service.workers == [] and sum("drained and left" in line for line in lines) == 2
    assert not service.fatal()
    service.scale(ScaleRequest("agg", 1))
    assert len(service.workers) == 1 and service.workers[0].alive
