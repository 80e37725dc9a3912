"""What a worker reports about itself (health, stats), from its state alone: no engine, no NATS."""

from __future__ import annotations

from types import SimpleNamespace

from dynvllm.settings import build_settings
from dynvllm.worker.role import Role
from dynvllm.worker.service import RESTARTS_ENV, Worker


def _worker(monkeypatch, restarts: str | None = None) -> Worker:
    if restarts is None:
        monkeypatch.delenv(RESTARTS_ENV, raising=False)
    else:
        monkeypatch.setenv(RESTARTS_ENV, restarts)
    return Worker(build_settings({}), "agg", Role())


async def test_health_follows_the_engine_and_its_canary(monkeypatch):
    w = _worker(monkeypatch)
    assert await w.health() == {
        "ok": True,  # no canary yet is not a failure
        "canary": {"ok": None, "at": 0.0, "seconds": None},
        "inflight": 0,
        "draining": False,
    }
    w.inflight.enter()
    w.stopping.set()
    w.last_canary = {"ok": False, "at": 1.0, "error": "boom"}
    h = await w.health()
    assert (h["ok"], h["inflight"], h["draining"]) == (False, 1, True)
    w.last_canary = {"ok": True, "at": 2.0, "seconds": 0.1}
    w.engine_dead = True
    assert (await w.health())["ok"] is False


async def test_stats_read_the_scheduler_the_relays_and_the_operations(monkeypatch):
    w = _worker(monkeypatch, restarts="2")
    w.snapshot.set_rank(0, 2, 1, 0.5)
    w.snapshot.set_rank(1, 1, 0, 0.25)
    w.snapshot.prefix_queries, w.snapshot.prefix_hits = 96, 64
    w.snapshot.add_connector_stats({"bytes_transferred": [10]})
    w.relays = [SimpleNamespace(relay_seq=3), SimpleNamespace(relay_seq=4)]
    w.inflight.enter()
    assert await w.stats() == {
        "inflight": 1,
        "running": 3,
        "waiting": 1,
        "kv_usage": 0.375,
        "prefix_queries": 96,
        "prefix_hits": 64,
        "kv_events_relayed": 7,
        "ranks": {
            "0": {"running": 2, "waiting": 1, "kv_usage": 0.5},
            "1": {"running": 1, "waiting": 0, "kv_usage": 0.25},
        },
        "kv_transfer": {"bytes_transferred": [1, 10.0]},
        "draining": 0,
        "sleeping": 0,
        "restarts": 2,
    }
    w.operations = SimpleNamespace(sleeping=1)
    w.stopping.set()
    s = w.stats_now()
    assert (s["sleeping"], s["draining"]) == (1, 1)
