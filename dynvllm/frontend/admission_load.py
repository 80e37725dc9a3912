"""Whether a model's workers can take one more request, from the load they report (pure: no
clock, no I/O; `gate.py` feeds it the reports and its own counts).

A worker is saturated when its engine queue (requests waiting beyond its running batch) reaches
`max_waiting`, or the share of its KV blocks in use reaches `max_kv_use`. Each worker reports its
engine's running and waiting requests and its KV blocks every 0.1 s while busy (1 s when idle).
Between two reports the frontend has let more requests through: each report is taken with this
frontend's requests (and their prompt blocks) in flight to the model when it arrived, and what
has been let through since then is taken off the room the reports left, so a burst between two
reports is not all let through; so are this frontend's requests that the engines did not hold
when they reported (on their way to a worker), so that a report sent just before they arrived
does not let as many through again. A worker's room for requests is its batch (`max_num_seqs` from
its card; without one, what it ran at the report, and one more when nothing waited) plus
`max_waiting`, less what it held; for KV,
`max_kv_use` of its blocks less those in use.

The requests let through since a report are spread over the model's workers evenly: the router
places them, not the admission queue. A worker that has not reported yet counts as idle when this
frontend had nothing in flight to it: it takes its batch plus `max_waiting`, and what ends gives
room back, as an in-flight cap would, until its first report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

INF = math.inf


@dataclass(frozen=True)
class Thresholds:
    #: Requests waiting in a worker's engine at which it counts as saturated (None: not checked).
    max_waiting: int | None = None
    #: Share of a worker's KV blocks in use at which it counts as saturated (None: not checked).
    max_kv_use: float | None = None

    @property
    def on(self) -> bool:
        return self.max_waiting is not None or self.max_kv_use is not None


class Report(NamedTuple):
    """One worker's load report, with this frontend's own counts when it arrived."""

    running: int
    waiting: int
    kv_used: int
    kv_total: int
    #: This frontend's requests in flight to the worker's model when the report arrived.
    requests: float = 0.0
    #: And their prompt blocks.
    blocks: float = 0.0


#: What a worker that has not reported yet counts as: idle, nothing of this frontend's in flight.
UNHEARD = Report(0, 0, 0, 0)


class Room(NamedTuple):
    """What the workers may still take before every one is saturated: requests, KV blocks."""

    requests: float
    blocks: float

    @property
    def any(self) -> bool:
        # One more request may take a worker a little past a threshold (its prompt may be long):
        # the thresholds are where letting requests through stops, not hard limits.
        return self.requests > 0 and self.blocks > 0


def worker_room(report: Report, seqs: int | None, t: Thresholds) -> Room:
    """Room a worker's report leaves (0, 0 when it is saturated by either measure)."""
    requests = blocks = INF
    if t.max_waiting is not None:
        if seqs:
            requests = seqs + t.max_waiting - (report.running + report.waiting)
        else:
            # Its batch size unknown: an engine that queues nothing has room for one more at least.
            requests = t.max_waiting - report.waiting + (report.waiting == 0)
        if report.waiting >= t.max_waiting and report.waiting > 0:
            requests = min(requests, 0)
    if t.max_kv_use is not None and report.kv_total > 0:
        blocks = t.max_kv_use * report.kv_total - report.kv_used
    if requests <= 0 or blocks <= 0:
        return Room(0.0, 0.0)
    return Room(float(requests), float(blocks))


def room(
    workers: Sequence[tuple[Report | None, int | None]],
    t: Thresholds,
    requests: float,
    blocks: float,
) -> Room:
    """Room left on the model's workers: each one's (report or None when it has not reported,
    its batch size or None), and this frontend's requests and prompt blocks in flight to the
    model now."""
    if not t.on:
        return Room(INF, INF)
    if not workers:
        return Room(0.0, 0.0)
    total_requests = total_blocks = 0.0
    base_requests = base_blocks = 0.0
    held = 0
    for report, seqs in workers:
        if report is None:
            report = UNHEARD
        free = worker_room(report, seqs, t)
        total_requests += free.requests
        total_blocks += free.blocks
        base_requests += report.requests
        base_blocks += report.blocks
        held += report.running + report.waiting
    n = len(workers)
    # Let through since the reports (negative: more ended than started, room the reports held);
    # and at least those of this frontend's requests the engines did not hold when they reported
    # (still on their way there, or ended and not yet seen here).
    sent = max(requests - base_requests / n, requests - held)
    return Room(total_requests - sent, total_blocks - (blocks - base_blocks / n))
