"""Routing decisions shared between frontends, so replicas choose alike (pure: no NATS here).

Every frontend's index is fed by the same KV events. What the events do not say is what each
frontend has in flight on each worker (its `Load`) and which prompts it has just sent where (the
short-lived predictions that stand in for events not yet arrived). Without both, two frontends
given the same prompt at the same moment disagreed in about half the cases. So each frontend
publishes its decisions and applies its peers' to its own Load and predictions:

    [0, ticket, instance, rank, blocks, keys]   started: `blocks` of prompt, `keys` its block keys
    [1, ticket]                                 finished
    [2, ticket, blocks]                         its output filled `blocks` more KV blocks

A batch, at most one per `min_interval` of the publisher: `[replica, seq, records, open, bye]`.
A heartbeat batch (sent even when idle) lists the tickets still open in `open`: a peer whose
finish record went missing prunes it then. A gap in a peer's sequence (batches lost: a NATS
outage) has the receiver announce its requests in flight again (in one batch, to all its peers),
as to a peer that joins.
A peer that says `bye`, or falls silent, has its requests taken out of the Load and its
predictions withdrawn.

What sharing costs is mostly wake-ups and messages, not records: a batch that arrives by itself
wakes its receiver's process, 50-100 us of CPU, where applying a record costs ~6
(`scripts/bench_share_records.py`). Frontends therefore read their peers' batches on demand
(`dynvllm.runtime.nats_pull`: when they route, and on a slow timer), which costs no wake-up; where
they cannot (TLS), nats-py delivers each batch. Each message still costs its sender a socket write
(on loopback, the delivery too) and NATS a fan-out to every peer, so only a started record sends
a batch at once: a finished or grew record lingers (up to `linger` seconds) until a started one
sends it along, and this frontend applies it to its own Load only when it goes out, so that it
and its peers still count the same (a request's end and its output's blocks count up to `linger`
later everywhere). At 100 requests/s of a frontend that halves the batches a request costs (2.0 ->
1.0; with 8 output blocks each, 4.7 -> 1.0); at 1,000 the publisher's `min_interval` batches
records anyway. A record lingers only while this frontend starts requests often enough that one
likely takes it along, the more peers the likelier it need be (`Outbox._lingers`): otherwise its
timer costs the publisher a wake-up of its own (at 10 requests/s, +7% of the sender's CPU with
nothing saved).
(A `linger` of 50 ms, the gap between `scripts/bench_replicas.py`'s probes, released the last
probe's requests in every frontend just as the next probe was routed: agreement 94.7%, 97.5%
before in that run; 20 ms does not meet them.)

A frontend with no peer publishes no records, only its heartbeats (`Outbox.alone`): a lone
frontend then pays nothing per request for sharing. A peer that appears (its first batch) is
sent a started record for every request still in flight, so it counts them too; peers that knew
them already skip the repeats.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dynvllm.router.index import Worker

STARTED, FINISHED, GREW = 0, 1, 2


class LoadLike(Protocol):
    inflight: Any

    def add(self, worker: str, rank: int, blocks: float, keys: Sequence[int]) -> None: ...
    def remove(self, worker: str, rank: int, blocks: float, keys: Sequence[int]) -> None: ...
    def count(self, worker: str, rank: int, delta: float) -> None: ...


class Predictor(Protocol):
    def predict_for_peer(self, worker: Worker, keys: list[int], now: float) -> float | None:
        """Count `keys` as cached on `worker` for a while; the expiry used (None: not counted)."""
        ...

    def retract(self, worker: Worker, keys: list[int], expiry: float) -> None: ...


class Outbox:
    """This frontend's decisions since the last batch, and its requests still in flight."""

    def __init__(
        self,
        replica: str,
        wake: Callable[[], None] = lambda: None,
        alone: bool = False,
        wake_later: Callable[[float], None] | None = None,
        linger: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replica = replica
        #: Called when the first record of a batch that must go soon arrives (a started one; any,
        #: when lingering does not pay): the publisher sends the batch on its next turn, so a
        #: request costs one list append, never a publish of its own.
        self.wake = wake
        #: Called with `linger` when a finished or grew record arrives with nothing else to send:
        #: the publisher sends the batch then unless a started record sends it first. Without it,
        #: those records wake the publisher like started ones.
        self.wake_later = wake_later
        self.linger = linger
        self.clock = clock
        #: Peers told (each saves a batch's wake-up when a record rides along).
        self.peers = 0 if alone else 1
        #: When this frontend last started a request, and the mean gap between its starts: a
        #: record lingers only while a start is likely enough to take it along (see `_lingers`).
        self._last_start = -math.inf
        self._gap = 0.0
        self.records: list[list] = []
        #: The publisher was woken for the records waiting (one of them must go soon).
        self._woken = False
        #: This frontend's own output growth and finished requests, applied to its Load as their
        #: records go out (in order).
        self._releases: list[Callable[[], None]] = []
        #: ticket -> (instance, rank, keys) of each request in flight.
        self.open: dict[int, tuple[str, int, Sequence[int]]] = {}
        #: ticket -> blocks it holds (prompt, then output grown), for peers that join late.
        self._blocks: dict[int, float] = {}
        #: A peer just appeared: the next batch goes out even with no records (a heartbeat), so
        #: the newcomer learns of this frontend at once and starts publishing to it.
        self._greet = False
        self.seq = 0
        self._tickets = itertools.count(1)

    @property
    def alone(self) -> bool:
        """No peer to tell: records are not kept (requests in flight still are, in `open`)."""
        return self.peers == 0

    def _add(self, record: list) -> None:
        if self.alone:
            return
        if not self._woken:
            self._woken = True
            self.wake()
        self.records.append(record)

    def _lingers(self) -> bool:
        """Whether waiting for a start is worth it. A record that rides along saves each peer a
        batch; one that does not costs the publisher a timer wake-up of its own. With starts at
        mean gap g (this frontend's, or the silence since its last, if longer), one comes within
        `linger` with probability 1 - exp(-linger / g): worth it above 1 / (peers + 1)."""
        gap = max(self._gap, self.clock() - self._last_start)
        return gap * math.log1p(1 / max(1, self.peers)) < self.linger

    def started(self, worker: str, rank: int, blocks: float, keys: Sequence[int]) -> int:
        if not self.alone and self.wake_later is not None:
            now = self.clock()
            if self._last_start > -math.inf:
                self._gap += 0.2 * (min(now - self._last_start, 1.0) - self._gap)
            self._last_start = now
        ticket = next(self._tickets)
        self.open[ticket] = (worker, rank, keys)
        self._blocks[ticket] = blocks
        self._add([STARTED, ticket, worker, rank, blocks, keys])
        return ticket

    def grew(self, ticket: int, blocks: int, count: Callable[[], None] | None = None) -> None:
        """The request's output filled `blocks` more KV blocks; `count` adds them to this
        frontend's Load: called when the record goes out, as for `finished`."""
        if ticket in self.open:
            self._blocks[ticket] += blocks
            if not self.alone:
                self._defer([GREW, ticket, blocks], count)
                return
        if count is not None:
            count()

    def finished(self, ticket: int, release: Callable[[], None] | None = None) -> None:
        """The request ended; `release` takes it out of this frontend's Load: called when its
        record goes out (at once when no peer is told)."""
        if self.open.pop(ticket, None) is not None:
            del self._blocks[ticket]
            if not self.alone:
                self._defer([FINISHED, ticket], release)
                return
        if release is not None:
            release()

    def _defer(self, record: list, then: Callable[[], None] | None) -> None:
        """Queue a record that may linger, and what this frontend applies when it goes out."""
        if self.wake_later is None or not self._lingers():
            self._add(record)
        else:
            if not self.records:
                self.wake_later(self.linger)
            self.records.append(record)
        if then is not None:
            self._releases.append(then)

    def peers_changed(self, peers: int, joined: bool) -> None:
        """The number of peers changed (`joined`: one appeared). Records stop while there are
        none; a peer that appears learns every request still in flight."""
        self.peers = peers
        if self.alone:
            self.records.clear()
            self._woken = False
            self._release()
        elif joined:
            # A greeting not yet sent carries every request in flight already (several peers
            # joining or showing gaps at once must not copy them several times into one batch).
            again = not self._greet
            self._greet = self._woken = True
            self.wake()
            if again:
                blocks = self._blocks
                for ticket, (worker, rank, keys) in self.open.items():
                    self._add([STARTED, ticket, worker, rank, blocks[ticket], keys])

    def match(self, worker: str, rank: int, keys: Sequence[int]) -> int:
        """The ticket of a request in flight like this one (for callers that kept no ticket)."""
        for ticket, (w, r, k) in self.open.items():
            if w == worker and r == rank and (k is keys or list(k) == list(keys)):
                return ticket
        return 0

    def batch(self, heartbeat: bool = False, bye: bool = False) -> list | None:
        """The next batch to publish (None: nothing to say)."""
        heartbeat, self._greet = heartbeat or self._greet, False
        if not self.records and not heartbeat and not bye:
            return None
        self.seq += 1
        records, self.records, self._woken = self.records, [], False
        self._release()
        return [self.replica, self.seq, records, list(self.open) if heartbeat else None, bye]

    def split(self, batch: list, limit: int, size: Callable[[Any], int]) -> list[list]:
        """`batch` (the last from `batch()`) as batches whose encoding (`size`) stays under
        `limit` bytes, numbered on from its sequence number, the open list and goodbye with the
        last: a NATS server refuses a message over its max_payload and closes the connection.
        A record over the limit by itself cannot go and is left out."""
        replica, seq, records, open_, bye = batch
        room = limit - size([replica, seq, [], None, False]) - 16
        parts: list[list] = [[]]
        used = 0
        for record in records:
            n = size(record)
            if n > room:
                continue
            if used + n > room:
                parts.append([])
                used = 0
            parts[-1].append(record)
            used += n
        tail = size([replica, seq, [], open_, bye])
        if used + tail > limit - 16:
            parts.append([])
        self.seq = seq + len(parts) - 1
        out = [[replica, seq + i, part, None, False] for i, part in enumerate(parts)]
        out[-1][3:] = [open_, bye]
        return out

    def _release(self) -> None:
        releases, self._releases = self._releases, []
        for release in releases:
            release()


@dataclass
class _Peer:
    seq: int = 0
    seen: float = 0.0
    #: ticket -> its started record as decoded, `[0, ticket, instance, rank, blocks, keys]`: kept
    #: as it came (a request costs no object of its own here).
    requests: dict[int, list] = field(default_factory=dict)
    #: ticket -> output blocks grown, for the requests that grew.
    grown: dict[int, float] = field(default_factory=dict)
    #: (expiry, worker, keys) of its predictions not yet expired, oldest first.
    predictions: deque[tuple[float, Worker, list[int]]] = field(default_factory=deque)


class Peers:
    """Other frontends' decisions, applied to this frontend's Load and predictions."""

    def __init__(
        self,
        replica: str,
        load: LoadLike,
        predictor: Predictor,
        silence: float,
        on_change: Callable[[int, bool], None] = lambda peers, joined: None,
    ) -> None:
        self.replica, self.load, self.predictor, self.silence = replica, load, predictor, silence
        #: Told (peers now, whether one joined) when a peer appears or leaves.
        self.on_change = on_change
        self._peers: dict[str, _Peer] = {}
        #: Batches missed (a sequence gap); heartbeats prune what they leave behind.
        self.gaps = 0

    def __contains__(self, replica: str) -> bool:
        return replica in self._peers

    def __len__(self) -> int:
        return len(self._peers)

    def apply(self, batch: Sequence[Any], now: float) -> None:
        replica, seq, records, open_, bye = batch
        if replica == self.replica:
            return
        if bye:
            self.drop(replica)
            return
        peer = self._peers.get(replica)
        if peer is None:
            peer = self._peers[replica] = _Peer(seq=seq - 1)
            self.on_change(len(self._peers), True)
        if seq != peer.seq + 1:
            # Its batches were lost (a NATS outage, a slow consumer), and so were ours, likely:
            # every request still in flight here is announced again, as to a peer that joins.
            self.gaps += 1
            self.on_change(len(self._peers), True)
        peer.seq, peer.seen = seq, now
        predictions = peer.predictions
        while predictions and predictions[0][0] <= now:
            predictions.popleft()
        load, requests = self.load, peer.requests
        inflight, add, predict = load.inflight, load.add, self.predictor.predict_for_peer
        for record in records:
            kind = record[0]
            if kind == STARTED:
                ticket = record[1]
                if ticket in requests:
                    continue  # sent again for a frontend that joined after it started
                requests[ticket] = record
                _, _, worker, rank, blocks, keys = record
                inflight[worker] += 1
                add(worker, rank, blocks, keys)
                if keys:
                    target = (worker, rank)
                    expiry = predict(target, keys, now)
                    if expiry is not None:
                        predictions.append((expiry, target, keys))
            elif kind == FINISHED:
                req = requests.pop(record[1], None)
                if req is not None:
                    self._end(peer, req)
            elif kind == GREW:
                req = requests.get(record[1])
                if req is not None and inflight.get(req[2], 0) > 0:
                    peer.grown[req[1]] = peer.grown.get(req[1], 0) + record[2]
                    load.count(req[2], req[3], record[2])
        if open_ is not None:
            still = set(open_)
            for ticket in [t for t in requests if t not in still]:
                self._end(peer, requests.pop(ticket))

    def _end(self, peer: _Peer, req: list) -> None:
        _, ticket, worker, rank, blocks, keys = req
        load = self.load
        grown = peer.grown.pop(ticket, 0) if peer.grown else 0
        if load.inflight.get(worker, 0) > 0:
            load.inflight[worker] -= 1
            load.remove(worker, rank, blocks, keys)
            if grown:
                load.count(worker, rank, -grown)

    def drop(self, replica: str) -> None:
        """A peer left: its requests leave the Load, its predictions are withdrawn."""
        peer = self._peers.pop(replica, None)
        if peer is None:
            return
        self.on_change(len(self._peers), False)
        for req in peer.requests.values():
            self._end(peer, req)
        for expiry, worker, keys in peer.predictions:
            self.predictor.retract(worker, keys, expiry)

    def expire(self, now: float) -> list[str]:
        """Drop the peers silent for longer than `silence` (their heartbeats stopped)."""
        gone = [r for r, p in self._peers.items() if now - p.seen > self.silence]
        for replica in gone:
            self.drop(replica)
        return gone

    def forget_worker(self, worker: str) -> None:
        """A worker left: the Load forgot it already; so do the peers' requests on it."""
        for peer in self._peers.values():
            for ticket in [t for t, r in peer.requests.items() if r[2] == worker]:
                del peer.requests[ticket]
                peer.grown.pop(ticket, None)
