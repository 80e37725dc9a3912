"""Routing decisions shared between frontends, so replicas choose alike (pure: no NATS here).

Every frontend's index is fed by the same KV events. What the events do not say is what each
frontend has in flight on each worker (its `Load`) and which prompts it has just sent where (the
short-lived predictions that stand in for events not yet arrived). Without both, two frontends
given the same prompt at the same moment disagreed in about half the cases. So each frontend
publishes its decisions and applies its peers' to its own Load and predictions:

    [0, ticket, instance, rank, blocks, keys]   started: `blocks` of prompt, `keys` its block keys
    [1, ticket]                                 finished
    [2, ticket, blocks]                         its output filled `blocks` more KV blocks

A batch, one per event-loop turn of the publisher: `[replica, seq, records, open, bye]`. A
heartbeat batch (sent even when idle) lists the tickets still open in `open`: a peer whose
finish record went missing prunes it then. A peer that says `bye`, or falls silent, has its
requests taken out of the Load and its predictions withdrawn.

A frontend with no peer publishes no records, only its heartbeats (`Outbox.alone`): a lone
frontend then pays nothing per request for sharing. A peer that appears (its first batch) is
sent a started record for every request still in flight, so it counts them too; peers that knew
them already skip the repeats.
"""

from __future__ import annotations

import itertools
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

    def __init__(self, replica: str, wake: Callable[[], None] = lambda: None, alone: bool = False) -> None:
        self.replica = replica
        #: No peer to tell: records are not kept (requests in flight still are, in `open`).
        self.alone = alone
        #: Called when the first record of a batch arrives: the publisher sends the batch on its
        #: next turn, so a request costs one list append, never a publish of its own.
        self.wake = wake
        self.records: list[list] = []
        #: ticket -> (instance, rank, keys) of each request in flight.
        self.open: dict[int, tuple[str, int, Sequence[int]]] = {}
        #: ticket -> blocks it holds (prompt, then output grown), for peers that join late.
        self._blocks: dict[int, float] = {}
        #: A peer just appeared: the next batch goes out even with no records (a heartbeat), so
        #: the newcomer learns of this frontend at once and starts publishing to it.
        self._greet = False
        self.seq = 0
        self._tickets = itertools.count(1)

    def _add(self, record: list) -> None:
        if self.alone:
            return
        if not self.records:
            self.wake()
        self.records.append(record)

    def started(self, worker: str, rank: int, blocks: float, keys: Sequence[int]) -> int:
        ticket = next(self._tickets)
        self.open[ticket] = (worker, rank, keys)
        self._blocks[ticket] = blocks
        self._add([STARTED, ticket, worker, rank, blocks, keys])
        return ticket

    def grew(self, ticket: int, blocks: int) -> None:
        if ticket in self.open:
            self._blocks[ticket] += blocks
            self._add([GREW, ticket, blocks])

    def finished(self, ticket: int) -> None:
        if self.open.pop(ticket, None) is not None:
            del self._blocks[ticket]
            self._add([FINISHED, ticket])

    def peers_changed(self, peers: int, joined: bool) -> None:
        """The number of peers changed (`joined`: one appeared). Records stop while there are
        none; a peer that appears learns every request still in flight."""
        self.alone = peers == 0
        if self.alone:
            self.records.clear()
        elif joined:
            self._greet = True
            self.wake()
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
        records, self.records = self.records, []
        return [self.replica, self.seq, records, list(self.open) if heartbeat else None, bye]


@dataclass
class _Request:
    worker: str
    rank: int
    blocks: float
    keys: Sequence[int]
    grown: int = 0


@dataclass
class _Peer:
    seq: int = 0
    seen: float = 0.0
    requests: dict[int, _Request] = field(default_factory=dict)
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
            self.gaps += 1
        peer.seq, peer.seen = seq, now
        predictions = peer.predictions
        while predictions and predictions[0][0] <= now:
            predictions.popleft()
        load, requests = self.load, peer.requests
        for record in records:
            kind = record[0]
            if kind == STARTED:
                _, ticket, worker, rank, blocks, keys = record
                if ticket in requests:
                    continue  # sent again for a frontend that joined after it started
                requests[ticket] = _Request(worker, rank, blocks, keys)
                load.inflight[worker] += 1
                load.add(worker, rank, blocks, keys)
                if keys:
                    expiry = self.predictor.predict_for_peer((worker, rank), keys, now)
                    if expiry is not None:
                        predictions.append((expiry, (worker, rank), keys))
            elif kind == FINISHED:
                req = requests.pop(record[1], None)
                if req is not None:
                    self._end(req)
            elif kind == GREW:
                req = requests.get(record[1])
                if req is not None and load.inflight.get(req.worker, 0) > 0:
                    req.grown += record[2]
                    load.count(req.worker, req.rank, record[2])
        if open_ is not None:
            still = set(open_)
            for ticket in [t for t in requests if t not in still]:
                self._end(requests.pop(ticket))

    def _end(self, req: _Request) -> None:
        load = self.load
        if load.inflight.get(req.worker, 0) > 0:
            load.inflight[req.worker] -= 1
            load.remove(req.worker, req.rank, req.blocks, req.keys)
            if req.grown:
                load.count(req.worker, req.rank, -req.grown)

    def drop(self, replica: str) -> None:
        """A peer left: its requests leave the Load, its predictions are withdrawn."""
        peer = self._peers.pop(replica, None)
        if peer is None:
            return
        self.on_change(len(self._peers), False)
        for req in peer.requests.values():
            self._end(req)
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
            for ticket in [t for t, r in peer.requests.items() if r.worker == worker]:
                del peer.requests[ticket]
