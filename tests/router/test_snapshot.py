"""A router index as a snapshot: wire form, and the cut-over to events buffered meanwhile."""

from __future__ import annotations

import random

import msgpack
import pytest

from dynvllm.frontend.routing import Router
from dynvllm.router import hashing
from dynvllm.router import snapshot as snap
from dynvllm.runtime.kv_topic import KvEventBatch
from dynvllm.settings import RouterSettings


def test_snapshots_round_trip_in_chunks():
    rng = random.Random(2)
    big = [rng.randrange(-(2**63) + 1, 2**63) for _ in range(5000)]
    parts = [(("w1", 0), 7, big), (("w2", 1), 3, [0, -1 << 62, (1 << 63) - 1]), (("w3", 0), 9, [])]
    messages = list(snap.encode(parts, limit=4096 + 8 * 1000))
    assert len(messages) == 6  # 5,003 keys at most 1,000 a message
    assert all(len(m) < 4096 + 8 * 1000 for m in messages)
    out = snap.decode(messages)
    assert out.workers == {
        ("w1", 0): (7, big),
        ("w2", 1): (3, [0, -1 << 62, (1 << 63) - 1]),
        ("w3", 0): (9, []),
    }
    assert out.blocks == 5003


def test_a_missing_or_reordered_message_is_refused():
    messages = list(snap.encode([(("w", 0), 1, list(range(3000)))], limit=4096 + 8 * 1000))
    with pytest.raises(ValueError, match="arrived where 1 was due"):
        snap.decode([messages[0], messages[2]])
    with pytest.raises(ValueError, match="incomplete"):
        snap.decode(messages[:-1])
    assert msgpack.unpackb(messages[-1])[1] is True


def _stored(iid: str, seq: int, keys: list[int]) -> KvEventBatch:
    return KvEventBatch(iid, 0, seq, [["stored", keys]])


def test_the_cut_over_applies_only_what_the_snapshot_lacks():
    s = snap.Snapshot({("w1", 0): (5, [1, 2]), ("w2", 0): (2, [])})
    buffered = [_stored("w1", 5, [9]), _stored("w1", 6, [3]), _stored("w2", 3, [4]), _stored("w3", 1, [5])]
    assert [(b.instance_id, b.seq) for b in snap.cut_over(s, buffered)] == [("w1", 6), ("w2", 3), ("w3", 1)]


def _prompt_keys(seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    tokens = [rng.randrange(500) for _ in range(320)]
    return tokens, hashing.chain(tokens, 32)


def test_a_new_router_starts_where_a_warm_peer_is():
    """The warm router has seen events 1..3 of w1 and 1 of w2. The new one subscribes, buffers
    w1's events 3..4 while the snapshot travels (3 is already in the snapshot), then loads it: it
    answers as the warm one does, and w1's next event continues without a gap."""
    warm, new = Router(RouterSettings(router="kv")), Router(RouterSettings(router="kv"))
    (_, k1), (_, k2), (_, k3) = _prompt_keys(1), _prompt_keys(2), _prompt_keys(3)
    warm.on_kv_events(_stored("w1", 1, k1[:5]))
    warm.on_kv_events(_stored("w1", 2, k1[5:]))
    warm.on_kv_events(_stored("w2", 1, k2))
    new.begin_bootstrap()
    for batch in (_stored("w1", 3, k3[:4]), _stored("w1", 4, k3[4:])):
        new.on_kv_events(batch)
        if batch.seq == 3:
            warm.on_kv_events(batch)
    assert new.index is not None and new.index.overlaps(k3) == {}  # held back
    parts = warm.policy.snapshot()
    assert parts is not None
    warm.index.predict(("w2", 0), k3, 10.0)  # a prediction stays out of the snapshot
    new.end_bootstrap(snap.decode(snap.encode(parts)))
    warm.on_kv_events(_stored("w1", 4, k3[4:]))
    assert new.index.overlaps(k1) == {("w1", 0): 10}
    assert new.index.overlaps(k2) == {("w2", 0): 10}
    assert new.index.overlaps(k3) == {("w1", 0): 10}
    new.on_kv_events(KvEventBatch("w1", 0, 5, [["removed", k1[8:]]]))
    assert new.policy.gaps == 0 and new.index.overlaps(k1) == {("w1", 0): 8}
    assert new.index.block_count() == warm.index.block_count() - 10 - 2  # less the prediction, removed


def test_a_gap_at_the_cut_over_drops_that_worker_as_any_gap_does():
    warm, new = Router(RouterSettings(router="kv")), Router(RouterSettings(router="kv"))
    _, k1 = _prompt_keys(1)
    warm.on_kv_events(_stored("w1", 1, k1[:5]))
    new.begin_bootstrap()
    new.on_kv_events(_stored("w1", 3, k1[5:]))  # 2 reached neither
    parts = warm.policy.snapshot()
    assert parts is not None
    new.end_bootstrap(snap.decode(snap.encode(parts)))
    assert new.policy.gaps == 1
    assert new.index is not None and new.index.overlaps(k1) == {}  # k1[5:] has no prefix there


def test_without_a_peer_the_buffered_events_apply_as_they_came():
    new = Router(RouterSettings(router="kv"))
    _, k1 = _prompt_keys(1)
    new.begin_bootstrap()
    new.on_kv_events(_stored("w1", 1, k1))
    new.end_bootstrap(None)
    assert new.index is not None and new.index.overlaps(k1) == {("w1", 0): 10}
    assert Router(RouterSettings(router="round-robin")).policy.snapshot() is None
