"""A router's block index as a snapshot, so a starting frontend routes warm at once (pure).

A frontend that starts while the service runs would otherwise route blind until every worker's
events have told it again what it holds. It asks a live peer for its index instead: per worker,
the block keys it holds (known from events) and the last relay sequence number it applied. While
the snapshot travels, the new frontend buffers the KV events that arrive; it then loads the
snapshot and applies the buffered batches newer than each worker's snapshot sequence (`cut_over`).

Wire form: msgpack messages, each `[index, last, records]`, a record `[instance, rank, seq, keys]`
(or `[instance, rank, seq, keys, tier]` for blocks in an offload tier, see `tiers`)
with keys as little-endian int64 bytes (a million keys pack and unpack as one copy, where a
msgpack list would spend a call per int). A worker with more keys than fit one message spans
several records; the receiver joins them.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import msgpack

from dynvllm.router.index import Worker
from dynvllm.router.tiers import GPU
from dynvllm.runtime.kv_topic import KvEventBatch

#: What a message may hold besides its keys (names, numbers, framing).
_OVERHEAD = 4096
_LITTLE = sys.byteorder == "little"


def _to_bytes(keys: list[int]) -> bytes:
    a = array("q", keys)
    if not _LITTLE:
        a.byteswap()
    return a.tobytes()


def _from_bytes(data: bytes) -> array:
    a = array("q")
    a.frombytes(data)
    if not _LITTLE:
        a.byteswap()
    return a


#: (worker, relay seq, keys), or with the offload tier the keys are in as a fourth element.
Part = tuple[Worker, int, list[int]] | tuple[Worker, int, list[int], int]


def encode(parts: Iterable[Part], limit: int = 1 << 20) -> Iterator[bytes]:
    """Messages of at most about `limit` bytes for (worker, relay seq, keys[, tier]) parts. A
    generator: a caller serving a live index may yield to its event loop between messages."""
    per_message = max(1, (limit - _OVERHEAD) // 8)
    records: list[list] = []
    room = per_message
    index = 0
    for part in parts:
        (iid, rank), seq, keys = part[0], part[1], part[2]
        tail = [part[3]] if len(part) > 3 and part[3] != GPU else []
        start = 0
        while True:
            take = keys[start : start + room]
            records.append([iid, rank, seq, _to_bytes(take), *tail])
            room -= len(take)
            start += len(take)
            if start >= len(keys):
                break
            yield msgpack.packb([index, False, records])
            index, records, room = index + 1, [], per_message
        if room <= 0 or len(records) >= 1024:
            yield msgpack.packb([index, False, records])
            index, records, room = index + 1, [], per_message
    yield msgpack.packb([index, True, records])


@dataclass
class Snapshot:
    #: Worker -> (last relay sequence applied, block keys held).
    workers: dict[Worker, tuple[int, list[int]]] = field(default_factory=dict)
    #: (tier, worker) -> block keys held in that offload tier.
    lower: dict[tuple[int, Worker], list[int]] = field(default_factory=dict)

    @property
    def blocks(self) -> int:
        return sum(len(keys) for _, keys in self.workers.values())


class Receiver:
    """Collects a snapshot's messages; `feed` says when the last one is in."""

    def __init__(self) -> None:
        self._next = 0
        self._keys: dict[Worker, list[array]] = {}
        self._seq: dict[Worker, int] = {}
        self._lower: dict[tuple[int, Worker], list[array]] = {}
        self.done = False

    def feed(self, data: bytes) -> bool:
        index, last, records = msgpack.unpackb(data, raw=False)
        if index != self._next:
            raise ValueError(f"snapshot message {index} arrived where {self._next} was due")
        self._next += 1
        for record in records:
            iid, rank, seq, keys = record[:4]
            worker = (iid, int(rank))
            self._seq[worker] = int(seq)
            if len(record) > 4:
                self._lower.setdefault((int(record[4]), worker), []).append(_from_bytes(keys))
                self._keys.setdefault(worker, [])
            else:
                self._keys.setdefault(worker, []).append(_from_bytes(keys))
        self.done = bool(last)
        return self.done

    def snapshot(self) -> Snapshot:
        if not self.done:
            raise ValueError("the snapshot is incomplete")
        out = Snapshot()
        for worker, pieces in self._keys.items():
            out.workers[worker] = (self._seq[worker], _join(pieces))
        for where, pieces in self._lower.items():
            out.lower[where] = _join(pieces)
        return out


def _join(pieces: list[array]) -> list[int]:
    return pieces[0].tolist() if len(pieces) == 1 else [k for p in pieces for k in p.tolist()]


def decode(messages: Iterable[bytes]) -> Snapshot:
    receiver = Receiver()
    for data in messages:
        receiver.feed(data)
    return receiver.snapshot()


def cut_over(snapshot: Snapshot, buffered: Iterable[KvEventBatch]) -> list[KvEventBatch]:
    """The batches buffered during a bootstrap that the snapshot does not already contain: those
    of workers it does not name, and those newer than its sequence for the workers it does."""
    seqs = {worker: seq for worker, (seq, _) in snapshot.workers.items()}
    return [b for b in buffered if b.seq > seqs.get((b.instance_id, b.dp_rank), -1)]
