"""One planner interval with discovery, the connector and the frontend's metrics faked: who acts,
what it asks the connector, what it exports."""

from __future__ import annotations

import asyncio

from prometheus_client import generate_latest

from dynvllm.planner.observe import parse
from dynvllm.planner.profile import Level, Point, Profile
from dynvllm.planner.service import Planner
from dynvllm.runtime.discovery import Instance
from dynvllm.settings import build_settings


class FakeWatcher:
    def __init__(self, instances: list[Instance]) -> None:
        self.all = instances

    def instances(self, component: str | None = None) -> list[Instance]:
        return [i for i in self.all if component is None or i.component == component]


class FakeConnector:
    def __init__(self, running: int) -> None:
        self.running = running
        self.applied: list = []

    async def workers(self, role: str) -> int:
        return self.running

    async def apply(self, decision, pids) -> None:
        self.applied.append((decision, pids))


def scrape(requests: int) -> list:
    text = f'dynvllm_requests_total{{model="tiny",status="200"}} {requests}\n'
    return parse("# TYPE dynvllm_requests counter\n" + text)


def planner(**over) -> Planner:
    level = Level(4, 4.0, 0.05, 0.1, 0.01, 0.02)
    settings = build_settings({"planner": {"predictor": "constant", "cooldown": 0, **over}})
    return Planner(settings, Profile({"agg": [Point(16, 8, [level])]}), ["agg"], "http://unused")


def test_the_first_started_planner_acts_and_asks_for_what_the_load_needs():
    me = Instance("p1", "planner", started=10.0)
    other = Instance("p2", "planner", started=20.0)
    worker = Instance("w1", "worker", role="agg", card={"model": "tiny"}, pid=4242)
    pl = planner()
    conn = FakeConnector(running=1)
    decisions = asyncio.run(
        pl.step(scrape(0), scrape(30), 2.0, 100.0, FakeWatcher([me, other, worker]), me, conn)
    )
    (d,) = decisions
    assert (d.current, d.target, d.start) == (1, 4, 3)  # 15 req/s at 4 per worker
    assert conn.applied == [(d, {"w1": 4242})]
    text = generate_latest(pl.metrics.registry).decode()
    assert "dynvllm_planner_active 1.0" in text
    assert 'dynvllm_planner_target_workers{role="agg"} 4.0' in text
    assert "dynvllm_planner_predicted_request_rate 15.0" in text

    standby = planner()
    conn2 = FakeConnector(running=1)
    watcher = FakeWatcher([me, other, worker])
    assert asyncio.run(standby.step(scrape(0), scrape(30), 2.0, 100.0, watcher, other, conn2)) == []
    assert (
        conn2.applied == []
        and "dynvllm_planner_active 0.0" in generate_latest(standby.metrics.registry).decode()
    )
