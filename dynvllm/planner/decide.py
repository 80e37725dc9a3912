"""How many workers a role needs, and which to drain. Pure: the planner feeds it the predicted
load, a worker's capacity from the profile, the live workers and the clock.

- Up: ceil(load / capacity) workers, at once: the cool-down holds scale-downs only (the latency
  target comes first; workers that are still starting count, so an up is never asked twice).
  A load is measured from a count of arrivals, so it carries that count's sampling noise: an up
  needs the load less `noise` (a few standard deviations of the measured rate) to exceed what
  the present workers carry, and then asks for ceil(load / capacity). A rate within noise of a
  boundary does not add a worker that the next interval shows was not needed; held requests
  (the backlog) are counted in the load by the caller, so a queue that builds still adds one.
- Surge: workers started by a look between intervals (for held requests) or at an interval
  beyond what the arrival rate needs two deviations below its estimate (for held requests or a
  rate not yet established) leave
  once nothing is held in excess and the rate fits the others at capacity, after the cool-down
  but without the threshold's hysteresis; otherwise one started for the queue of a ramp's slow
  starts is kept for the whole plateau that follows.
- Down: only to a count whose capacity times `scale_down_threshold` still carries the load, and
  only after `scale_down_after` intervals in a row below it (or at once when the predictor expects
  the load that many intervals ahead to fit as well: a ramp down is not waited out interval by
  interval) and `cooldown` seconds after the last change (hysteresis: a load near a boundary
  does not flap). Workers leave by draining (their
  in-flight requests finish), the least busy first: a decision names them, it never kills.
- Zero: with `min_workers` 0 a role keeps one worker until it has been idle (no requests, none
  in flight or waiting) for `idle_after` seconds, whatever the predictor still expects; it stays
  at zero until a request waits, which brings workers back at once, cool-down or not, since a
  client is waiting for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dynvllm.planner.observe import Observation


@dataclass(frozen=True)
class Policy:
    min_workers: int = 1
    max_workers: int = 8
    cooldown: float = 30.0
    scale_down_after: int = 3
    scale_down_threshold: float = 0.7
    idle_after: float = 0.0


@dataclass
class RoleState:
    """What the decision remembers about a role between intervals."""

    below: int = 0  # intervals in a row that a smaller count would have carried the load
    surge: int = 0  # workers beyond what the arrival rate needs, started to clear held requests
    last_change: float = -math.inf
    idle_since: float | None = None


@dataclass(frozen=True)
class WorkerView:
    id: str
    inflight: int = 0  # running plus waiting in its engine


@dataclass(frozen=True)
class Decision:
    role: str
    current: int
    target: int
    start: int = 0
    drain: tuple[str, ...] = field(default_factory=tuple)
    reason: str = ""

    @property
    def action(self) -> str:
        return "up" if self.start else "down" if self.drain else "hold"


def rate_noise(rate: float, seconds: float, sigmas: float) -> float:
    """`sigmas` standard deviations of a rate measured by counting arrivals over `seconds`
    (Poisson: the count's deviation is its square root), in the rate's unit."""
    if sigmas <= 0 or seconds <= 0 or rate <= 0:
        return 0.0
    return sigmas * math.sqrt(rate * seconds) / seconds


def _need(load: float, capacity: float) -> int:
    if load <= 1e-9:
        return 0
    if capacity <= 0:
        return 1 << 30  # no capacity known: as many as allowed
    return math.ceil(load / capacity - 1e-9)


def decide(
    role: str,
    load: float,
    capacity: float,
    workers: list[WorkerView],
    obs: Observation,
    state: RoleState,
    policy: Policy,
    now: float,
    current: int | None = None,
    up_only: bool = False,
    noise: float = 0.0,
    ahead: float | None = None,
    backlog: float = 0.0,
) -> Decision:
    """The decision for one role this interval; updates `state`. `current` counts workers that
    started but have not registered yet as well (default: the registered `workers`). `up_only`:
    a check between intervals (requests are held), which may add workers but neither counts
    an interval toward a scale-down nor the idle time. `noise`: how far (req/s) the load must
    be above the present workers' capacity before one is added (see `rate_noise`). `ahead`: the
    load a predictor expects `scale_down_after` intervals from now; where it fits the smaller
    count too, a scale-down does not wait those intervals to see it (a falling trend).
    `backlog`: the part of `load` (req/s) that clears held requests; workers started for it or
    for a rate within noise of the count below leave once nothing is held in excess and the rate
    fits without them."""
    current = len(workers) if current is None else max(current, len(workers))
    busy = (
        obs.requests > 0
        or obs.inflight > 0
        or obs.waiting_for_worker > 0
        or obs.queue_depth > 0
        or obs.admission_queue > 0
    )
    if busy:
        state.idle_since = None
    elif state.idle_since is None and not up_only:
        state.idle_since = now
    floor = policy.min_workers
    if floor == 0:
        idle_long = (
            policy.idle_after > 0
            and state.idle_since is not None
            and now - state.idle_since >= policy.idle_after
        )
        floor = 0 if idle_long else 1
        if idle_long:
            # Idle means no requests: what a predictor still expects (the tail of a trend that
            # decays toward zero but never reaches it) holds no worker; a request brings one back.
            load = 0.0

    def clamp(n: int) -> int:
        return max(floor, min(policy.max_workers, n))

    def rate_need(margin: float = 0.0) -> int:
        return clamp(_need(load - backlog - margin, capacity))

    if current == 0 and busy:
        state.below, state.last_change = 0, now
        target = max(1, clamp(_need(load, capacity)))
        state.surge = max(0, target - max(1, rate_need(noise)))
        return Decision(role, 0, target, start=target, reason="requests wait and no worker serves them")

    up = clamp(_need(load, capacity))
    if up > current and clamp(_need(load - noise, capacity)) <= current:
        if up_only:
            return Decision(role, current, current, reason="within noise of capacity")
        state.below = 0
        return Decision(
            role, current, current, reason=f"load {load:.2f} req/s within noise ({noise:.2f}) of capacity"
        )
    if up > current:
        state.below = 0
        state.last_change = now
        if up_only:
            # A look acts on held requests and a rate over a fraction of a second: what it adds
            # is kept only as far as the next intervals' rate needs it.
            state.surge += up - current
        else:
            # Workers the rate needs only within two deviations are provisional: on a plateau
            # of a dozen intervals, one of them is one and a half deviations high.
            state.surge = max(0, up - max(current - state.surge, rate_need(2 * noise)))
        return Decision(
            role,
            current,
            up,
            start=up - current,
            reason=f"load {load:.2f} req/s over {capacity:.2f} per worker",
        )

    if up_only:
        return Decision(role, current, current, reason="within capacity")
    if state.surge:
        # Workers started for a backlog: once it is cleared, they leave as soon as the rate fits
        # the others at capacity (no threshold: the rate alone never asked for them).
        # The rate grows into them only where its lower bound needs them (one high interval
        # does not make a surge permanent); they stay while its estimate, or a rising
        # forecast beyond its noise, needs them.
        state.surge = min(state.surge, max(0, current - rate_need(noise)))
        keep = max(rate_need(), current - state.surge)
        if ahead is not None:
            keep = max(keep, clamp(_need(ahead - backlog - noise, capacity)))
        if state.surge and not backlog and keep < current and now - state.last_change >= policy.cooldown:
            state.below, state.last_change, state.surge = 0, now, 0
            why = f"held requests cleared; load {load:.2f} req/s fits {keep}"
            return _drain(role, workers, current, keep, why)
    down = clamp(_need(load, capacity * policy.scale_down_threshold))
    if down >= current:
        state.below = 0
        return Decision(role, current, current, reason="within capacity")
    state.below += 1
    foreseen = ahead is not None and _need(ahead, capacity * policy.scale_down_threshold) <= down
    # To zero, `idle_after` was the wait: no further intervals are counted.
    if down and state.below < policy.scale_down_after and not foreseen:
        return Decision(
            role,
            current,
            current,
            reason=f"{down} would do ({state.below}/{policy.scale_down_after} intervals)",
        )
    if now - state.last_change < policy.cooldown:
        return Decision(role, current, current, reason=f"{down} would do, in cool-down")
    state.below, state.last_change, state.surge = 0, now, 0
    why = "idle" if down == 0 else f"load {load:.2f} req/s fits {down} at {policy.scale_down_threshold:.0%}"
    return _drain(role, workers, current, down, why)


def _drain(role: str, workers: list[WorkerView], current: int, keep: int, why: str) -> Decision:
    """Down to `keep`: the least busy workers drain (their in-flight requests finish)."""
    quiet = sorted(workers, key=lambda w: (w.inflight, w.id))[: current - keep]
    return Decision(role, current, keep, drain=tuple(w.id for w in quiet), reason=why)
