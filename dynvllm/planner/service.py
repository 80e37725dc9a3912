"""`dynvllm planner`: every interval, read the frontend's metrics and the workers' load, predict,
decide per role, and have the connector carry the decision out.

Several planners may run: each holds an instance lease in discovery (component "planner") and
the one that started first among the live ones acts; the others observe and predict (so they
are warm) but decide nothing until its lease expires.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from dynvllm import registry
from dynvllm.planner import observe as obs_mod
from dynvllm.planner.connector import ConnectorError
from dynvllm.planner.decide import Decision, Policy, RoleState, WorkerView, decide, rate_noise
from dynvllm.planner.predictors import MovingAverage
from dynvllm.planner.profile import Profile
from dynvllm.settings import Settings

log = logging.getLogger("dynvllm.planner")
COMPONENT = "planner"


class PlannerMetrics:
    """Decisions and predictions as Prometheus metrics, served on --planner-metrics-port."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        r = self.registry = CollectorRegistry()
        self.active = Gauge(
            "dynvllm_planner_active", "1 on the planner that decides, 0 on a standby", registry=r
        )
        self.observed = Gauge(
            "dynvllm_planner_observed", "Last interval's load by quantity", ["quantity"], registry=r
        )
        self.predicted = Gauge(
            "dynvllm_planner_predicted_request_rate",
            "Request rate predicted for the next interval",
            registry=r,
        )
        self.capacity = Gauge(
            "dynvllm_planner_capacity_per_worker",
            "Request rate one worker carries at the targets",
            ["role"],
            registry=r,
        )
        self.workers = Gauge(
            "dynvllm_planner_workers", "Workers of the role when deciding", ["role"], registry=r
        )
        self.target = Gauge(
            "dynvllm_planner_target_workers", "Workers the last decision asked for", ["role"], registry=r
        )
        self.decisions = Counter(
            "dynvllm_planner_decisions",
            "Decisions by role and action (up, down, hold)",
            ["role", "action"],
            registry=r,
        )
        self.failures = Counter(
            "dynvllm_planner_connector_failures",
            "Decisions the connector could not carry out",
            ["role"],
            registry=r,
        )

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        from prometheus_client import start_http_server

        server, _ = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return int(server.server_port)


@dataclass
class Planner:
    settings: Settings
    profile: Profile
    roles: list[str]
    frontend_url: str
    metrics: PlannerMetrics = field(default_factory=PlannerMetrics)
    states: dict[str, RoleState] = field(default_factory=dict)
    load: dict[str, tuple[int, int]] = field(default_factory=dict)  # instance id -> (running, waiting)
    history: list[tuple[obs_mod.Observation, float, list[Decision]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        ps = self.settings.planner
        self.predictor = registry.load(registry.PLANNER_PREDICTORS, ps.predictor)(ps.predictor_window)
        self.policy = Policy(
            ps.min_workers,
            ps.max_workers,
            ps.cooldown,
            ps.scale_down_after,
            ps.scale_down_threshold,
            ps.idle_after,
        )
        first = next(iter(self.profile.roles.values()))[0]
        self.isl, self.osl = float(first.isl), float(first.osl)  # until requests say otherwise
        # Lengths averaged over intervals with requests: one odd interval must not swing capacity.
        self._isl, self._osl = MovingAverage(ps.predictor_window), MovingAverage(ps.predictor_window)
        # The share of requests that cross a prefill worker (the others skip the hop: short or
        # cached prompts); 1 until measured.
        self._prefill_share = MovingAverage(ps.predictor_window)

    def share(self, role: str) -> float:
        """The part of the request rate a role serves: prefill only the requests that take the
        hop, every other role all of them."""
        if role != "prefill" or not self._prefill_share.values:
            return 1.0
        return self._prefill_share.predict()

    def leader(self, watcher: Any, me: Any) -> bool:
        planners = watcher.instances(COMPONENT) or [me]
        return min(planners, key=lambda i: (i.started, i.id)).id == me.id

    async def run(self, stop: asyncio.Event) -> None:
        from dynvllm.runtime import nats as natsrt
        from dynvllm.runtime.discovery import Instance, Lease, Watcher
        from dynvllm.runtime.events import LOAD, EventBus

        rt, ps = self.settings.runtime, self.settings.planner
        nc = await natsrt.connect(rt, name="dynvllm-planner")
        connector = registry.load(registry.PLANNER_CONNECTORS, ps.planner_connector)(self.settings, nc)
        watcher = Watcher(nc, rt.namespace, rt.lease_ttl)

        def on_load(ev: Any) -> None:
            self.load[ev.instance_id] = (ev.running, ev.waiting)

        await EventBus(nc, rt.namespace).subscribe(LOAD, on_load)
        await watcher.start()
        # Reachable from other hosts (a Prometheus in the cluster) when it announces itself to them.
        bind = "127.0.0.1" if natsrt.advertised_host(rt) == "127.0.0.1" else "0.0.0.0"
        port = self.metrics.serve(ps.planner_metrics_port, bind) if ps.planner_metrics_port >= 0 else None
        me = Instance.new(COMPONENT, role=COMPONENT, card={"metrics_port": port, "roles": self.roles})
        lease = Lease(nc, rt.namespace, me, rt.heartbeat_interval)
        await lease.start()
        log.warning("planner %s: scaling %s; metrics on port %s", me.id, ", ".join(self.roles), port)
        async with httpx.AsyncClient(timeout=5) as http:
            before, at = await self._scrape(http), time.monotonic()
            look, look_at = before, at  # the last look between intervals (or the interval's start)
            try:
                while not stop.is_set():
                    # Up to the interval's end, looking at held requests every react interval.
                    left = ps.planner_interval - (time.monotonic() - at)
                    react = ps.planner_react_interval
                    try:
                        await asyncio.wait_for(stop.wait(), max(0.0, min(left, react) if react else left))
                        break
                    except TimeoutError:
                        pass
                    now_samples, now = await self._scrape(http), time.monotonic()
                    ended = now - at >= ps.planner_interval - 1e-3
                    if now_samples is None or before is None:
                        if ended:
                            before, at = look, look_at = now_samples, now
                        continue
                    if not ended:
                        # The rate since the last look as well: since the interval began, a
                        # burst's first second is averaged with the quiet before it.
                        since = (look, now - look_at) if look is not None else None
                        await self.step(
                            before,
                            now_samples,
                            now - at,
                            now,
                            watcher,
                            me,
                            connector,
                            react=True,
                            since=since,
                        )
                        look, look_at = now_samples, now
                        continue
                    await self.step(before, now_samples, now - at, now, watcher, me, connector)
                    before, at = look, look_at = now_samples, now
            finally:
                await lease.stop()
                await watcher.stop()
                await natsrt.close(nc)

    async def _scrape(self, http: httpx.AsyncClient) -> list[obs_mod.Sample] | None:
        """Every frontend's metrics, summed: the URL's name may resolve to several addresses (a
        headless Service of the frontend pods), and each is read."""
        try:
            texts = await asyncio.gather(
                *(http.get(url + "/metrics") for url in await frontend_urls(self.frontend_url))
            )
            for r in texts:
                r.raise_for_status()
            return [s for r in texts for s in obs_mod.parse(r.text)]
        except (httpx.HTTPError, ValueError, OSError) as exc:
            log.warning("cannot read the frontend's metrics at %s: %s", self.frontend_url, exc)
            return None

    async def step(
        self,
        before: list,
        now_samples: list,
        seconds: float,
        now: float,
        watcher: Any,
        me: Any,
        connector: Any,
        react: bool = False,
        since: tuple[list, float] | None = None,
    ) -> list[Decision]:
        """One interval: observe, predict, and (on the active planner) decide and apply.

        A role's load is the predicted rate (its share of it) plus the held requests beyond what
        its serving workers clear within half the TTFT target, over an interval. `react`: a look
        between two intervals' ends (`seconds` since the last one) that only adds workers, and
        only when there is such an excess (none serving: any held request), so a burst does not
        wait for the interval's end; the predictor and the averages see whole intervals only.
        `since`: the previous look's samples and the seconds since it; the arrival rate of a
        look is the higher of that since the interval began and that since the previous look."""
        ps = self.settings.planner
        model = ps.planner_model
        workers = [i for i in watcher.instances("worker") if model is None or i.card.get("model") == model]
        queue = sum(self.load.get(i.id, (0, 0))[1] for i in workers)
        obs = obs_mod.observe(before, now_samples, seconds, model, queue_depth=queue)
        # A backlog is load too, in the engines or held by the frontend for a worker (a burst at
        # zero workers): enough workers to clear it within one interval.
        backlog = obs.queue_depth + obs.waiting_for_worker + obs.admission_queue
        if react:
            if not backlog or not self.leader(watcher, me):
                return []
            # (rate, seconds it was measured over): the noise of the highest is that of its window.
            rates = [(self._predicted(), ps.planner_interval), (obs.arrival_rate, seconds)]
            if since and since[1] > 0:
                rates.append((obs_mod.observe(since[0], now_samples, since[1], model).arrival_rate, since[1]))
            predicted, window = max(rates)
        else:
            self.predictor.observe(obs.arrival_rate)
            predicted, window = self._predicted(), ps.planner_interval
            if obs.requests:
                self._isl.observe(obs.isl)
                self._osl.observe(obs.osl)
                self.isl, self.osl = self._isl.predict(), self._osl.predict()
                self._prefill_share.observe(min(1.0, obs.prefill_requests / obs.requests))
            self._record(obs, predicted)
        span = max(ps.planner_interval if react else seconds, 1e-6)
        noise = rate_noise(predicted, window, ps.planner_noise_band)
        ahead = None if react else self._ahead()
        active = self.leader(watcher, me)
        self.metrics.active.set(1 if active else 0)
        decisions = []
        for role in self.roles:
            cap = self.profile.capacity(role, self.isl, self.osl, ps.ttft_target, ps.itl_target)
            self.metrics.capacity.labels(role).set(cap)
            mine = [i for i in workers if i.role == role]
            if not active:
                continue
            share = self.share(role)
            # What the serving workers clear within half the TTFT target is no reason to add
            # one (at a high utilisation a few requests always wait for a batch slot); the rest
            # is load, to be cleared within one interval.
            excess = max(0.0, backlog * share - len(mine) * cap * ps.ttft_target / 2)
            if react and not excess:
                continue
            try:
                current = await connector.workers(role)
            except ConnectorError as exc:
                log.warning("%s", exc)
                current = None
            views = [WorkerView(i.id, sum(self.load.get(i.id, (0, 0)))) for i in mine]
            state = self.states.setdefault(role, RoleState())
            load = predicted * share + excess / span
            d = decide(
                role,
                load,
                cap,
                views,
                obs,
                state,
                self.policy,
                now,
                current,
                up_only=react,
                noise=noise * share,
                ahead=None if ahead is None else ahead * share + excess / span,
                backlog=excess / span,
            )
            if react and d.action == "hold":
                continue
            self.metrics.workers.labels(role).set(d.current)
            self.metrics.target.labels(role).set(d.target)
            self.metrics.decisions.labels(role, d.action).inc()
            if d.action != "hold":
                log.warning(
                    "%s: %d -> %d workers (%s)%s [%s: %.1f req/s arrived, %g in flight, %g held, "
                    "noise %.1f req/s]",
                    role,
                    d.current,
                    d.target,
                    d.reason,
                    f"; draining {', '.join(d.drain)}" if d.drain else "",
                    "look" if react else "interval",
                    obs.arrival_rate,
                    obs.inflight,
                    backlog,
                    noise * share,
                )
                try:
                    await connector.apply(d, {i.id: i for i in mine})
                except ConnectorError as exc:
                    self.metrics.failures.labels(role).inc()
                    log.error("%s: %s", role, exc)
            decisions.append(d)
        if not react:
            self.history.append((obs, predicted, decisions))
            del self.history[:-100]
        return decisions

    def _predicted(self) -> float:
        """The next interval's rate, or the rate `--planner-lookahead` ahead where higher."""
        ps = self.settings.planner
        predicted = self.predictor.predict()
        steps = math.ceil(ps.planner_lookahead / ps.planner_interval - 1e-9)
        if steps > 1 and hasattr(self.predictor, "forecast"):
            # Up as early as a start-up needs; down no earlier than the next interval allows.
            predicted = max(predicted, self.predictor.forecast(steps))
        return predicted

    def _ahead(self) -> float | None:
        """The rate the predictor expects `--scale-down-after` intervals (or the lookahead, if
        longer) from now; None for a predictor that sees only the next interval."""
        ps = self.settings.planner
        forecast = getattr(self.predictor, "forecast", None)
        if forecast is None:
            return None
        steps = max(ps.scale_down_after, math.ceil(ps.planner_lookahead / ps.planner_interval - 1e-9))
        return float(forecast(steps))

    def _record(self, obs: obs_mod.Observation, predicted: float) -> None:
        self.metrics.predicted.set(predicted)
        for name in (
            "request_rate",
            "arrival_rate",
            "isl",
            "osl",
            "inflight",
            "queue_depth",
            "waiting_for_worker",
            "admission_queue",
            "ttft_p50",
            "ttft_p90",
            "itl_p50",
            "itl_p90",
        ):
            value = getattr(obs, name)
            if not math.isnan(value):
                self.metrics.observed.labels(name).set(value)


async def frontend_urls(url: str) -> list[str]:
    """One URL per address the URL's host name resolves to (itself for an IP address)."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
        return [url]
    except ValueError:
        pass
    # IPv4 only: a name like localhost has an IPv6 address as well, the same frontend twice.
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, parts.port, family=socket.AF_INET, type=socket.SOCK_STREAM
        )
    except OSError:
        return [url]
    addrs = sorted({str(info[4][0]) for info in infos})
    if len(addrs) <= 1:
        return [url]
    port = f":{parts.port}" if parts.port else ""
    return [parts._replace(netloc=f"{a}{port}").geturl() for a in addrs]


def run_planner(settings: Settings, profile: Profile, roles: list[str], frontend_url: str) -> int:
    import signal

    from dynvllm.runtime import nats as natsrt

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Planner(settings, profile, roles, frontend_url).run(stop)

    natsrt.run(main())
    return 0
