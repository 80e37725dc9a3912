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
    assert conn.applied == [(d, {"w1": worker})]
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


class RoleConnector(FakeConnector):
    def __init__(self, running: dict[str, int]) -> None:
        super().__init__(0)
        self.per_role = running

    async def workers(self, role: str) -> int:
        return self.per_role[role]


def test_prefill_and_decode_counts_come_from_their_own_targets_and_shares():
    # Per worker: prefill carries 4 req/s within TTFT, decode 10 req/s within ITL (one sweep of
    # a pair, read by the target each role governs).
    sweep = [Level(2, 4.0, 0.2, 0.4, 0.01, 0.012), Level(8, 10.0, 1.0, 2.0, 0.02, 0.03)]
    profile = Profile(
        {"prefill": [Point(16, 8, sweep)], "decode": [Point(16, 8, sweep)]},
        targets={"prefill": ("ttft",), "decode": ("itl",)},
    )
    settings = build_settings({"planner": {"predictor": "constant", "cooldown": 0, "max_workers": 16}})
    pl = Planner(settings, profile, ["prefill", "decode"], "http://unused")
    me = Instance("p1", "planner", started=10.0)

    def scrape_with_hops(requests: int, remote: int, short: int) -> list:
        text = (
            "# TYPE dynvllm_requests counter\n"
            f'dynvllm_requests_total{{model="tiny",status="200"}} {requests}\n'
            "# TYPE dynvllm_disagg_prefill counter\n"
            f'dynvllm_disagg_prefill_total{{model="tiny",outcome="remote"}} {remote}\n'
            f'dynvllm_disagg_prefill_total{{model="tiny",outcome="skipped_short"}} {short}\n'
        )
        return parse(text)

    conn = RoleConnector({"prefill": 1, "decode": 1})
    # 40 req/s, a quarter of them long enough for the hop: prefill sees 10 req/s, decode 40.
    decisions = asyncio.run(
        pl.step(
            scrape_with_hops(0, 0, 0),
            scrape_with_hops(80, 20, 60),
            2.0,
            100.0,
            FakeWatcher([me]),
            me,
            conn,
        )
    )
    got = {d.role: (d.current, d.target) for d in decisions}
    assert got == {"prefill": (1, 3), "decode": (1, 4)}  # ceil(10 / 4), ceil(40 / 10)
    assert pl.share("prefill") == 0.25 and pl.share("decode") == 1.0


def test_lookahead_asks_for_a_ramps_workers_a_start_up_early():
    me = Instance("p1", "planner", started=10.0)

    def run(lookahead: float) -> int:
        settings = build_settings(
            {
                "planner": {
                    "predictor": "holt-winters",
                    "predictor_window": 1000,
                    "planner_interval": 10,
                    "planner_lookahead": lookahead,
                    "cooldown": 0,
                    "max_workers": 32,
                }
            }
        )
        pl = Planner(
            settings, Profile({"agg": [Point(16, 8, [Level(4, 4.0, 0.05, 0.1, 0.01, 0.02)])]}), ["agg"], "x"
        )
        conn, total, target = FakeConnector(running=1), 0, 0
        for k in range(1, 11):  # +4 req/s every 10 s interval
            before, total = total, total + 40 * k
            (d,) = asyncio.run(
                pl.step(scrape(before), scrape(total), 10.0, 10.0 * k, FakeWatcher([me]), me, conn)
            )
            target = d.target
        return target

    # 40 req/s now, 44 next interval (11 workers); 60 s ahead ~64 req/s (16 workers).
    assert run(0) == 11
    assert 15 <= run(60) <= 17


def held(requests: int, inflight: int, queued: int) -> list:
    """A frontend with `queued` requests in its admission queue among `inflight`."""
    return parse(
        "# TYPE dynvllm_requests counter\n"
        f'dynvllm_requests_total{{model="tiny",status="200"}} {requests}\n'
        "# TYPE dynvllm_inflight_requests gauge\n"
        f'dynvllm_inflight_requests{{model="tiny"}} {inflight}\n'
        "# TYPE dynvllm_admission_queue_length gauge\n"
        f'dynvllm_admission_queue_length{{model="tiny"}} {queued}\n'
    )


def test_held_requests_add_workers_between_intervals_when_they_would_wait_too_long():
    me = Instance("p1", "planner", started=10.0)
    worker = Instance("w1", "worker", role="agg", card={"model": "tiny"}, pid=4242)
    pl = planner(planner_interval=10, ttft_target=0.5)  # one worker: 4 req/s at the targets
    conn = FakeConnector(running=1)
    watch = FakeWatcher([me, worker])
    # 1 held: a quarter second's wait at 4 req/s, within half the target: nothing is done.
    assert asyncio.run(pl.step(held(0, 0, 0), held(0, 3, 1), 1.0, 1.0, watch, me, conn, react=True)) == []
    # A burst: 12 arrived in 1 s, 10 of them held: up now, for the arrivals and the held ones
    # beyond the 1 the serving worker clears within half the target.
    (d,) = asyncio.run(pl.step(held(0, 0, 0), held(0, 2, 10), 1.0, 2.0, watch, me, conn, react=True))
    assert (d.current, d.target) == (1, 4)  # ceil((12 + 9 / 10) / 4)
    # The look fed no predictor and no history: the interval's end sees whole intervals only.
    assert pl.predictor.predict() == 0 and pl.history == []
    # No worker serves: any held request asks for one, as at zero workers.
    pl2, conn0 = planner(planner_interval=10), FakeConnector(running=0)
    (d,) = asyncio.run(
        pl2.step(held(0, 0, 0), held(0, 0, 1), 0.5, 1.0, FakeWatcher([me]), me, conn0, react=True)
    )
    assert (d.current, d.start) == (0, 1)
    # A burst 0.5 s old, 1.5 s into the interval: 12 arrived since the last look 0.5 s ago, a
    # rate of 24 req/s, not 12 / 1.5 s = 8: it asks for the burst's workers at once.
    pl3, conn3 = planner(planner_interval=10), FakeConnector(running=0)
    (d,) = asyncio.run(
        pl3.step(
            held(0, 0, 0), held(0, 0, 12), 1.5, 1.0, FakeWatcher([me]), me, conn3, react=True,
            since=(held(0, 0, 0), 0.5),
        )
    )  # fmt: skip
    assert d.target == 7  # ceil((24 + 12 / 10) / 4)


def test_the_predictor_is_fed_arrivals_so_a_burst_shows_before_it_is_answered():
    me = Instance("p1", "planner", started=10.0)
    pl = planner(planner_interval=2)
    (d,) = asyncio.run(
        pl.step(held(0, 0, 0), held(4, 20, 0), 2.0, 2.0, FakeWatcher([me]), me, FakeConnector(1))
    )
    assert pl.predictor.predict() == 12.0 and d.target == 3  # (4 ended + 20 in flight) / 2 s


def test_a_looks_short_window_rate_adds_a_worker_only_beyond_its_noise():
    me = Instance("p1", "planner", started=10.0)
    three = [Instance(f"w{k}", "worker", role="agg", card={"model": "tiny"}, pid=k + 1) for k in range(3)]
    watch = FakeWatcher([me, *three])

    def look(band: float) -> list:
        # 3 workers of 4 req/s; 20 arrived in the 2 s since the interval began (10 req/s), 3 of
        # them in the 0.2 s since the last look (15 req/s, give or take 8.7); 4 held, 1 beyond
        # what the three clear within half the TTFT target.
        pl = planner(planner_interval=10, ttft_target=0.5, planner_noise_band=band)
        return asyncio.run(
            pl.step(
                held(0, 0, 0), held(0, 16, 4), 2.0, 2.0, watch, me, FakeConnector(3), react=True,
                since=(held(0, 14, 3), 0.2),
            )
        )  # fmt: skip

    assert look(1.0) == []  # three carry 12 req/s: the 15 of three arrivals is within noise
    (d,) = look(0.0)
    assert (d.current, d.target) == (3, 4)  # ceil((15 + 1 / 10) / 4)
