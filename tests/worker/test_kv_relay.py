"""The KV-event relay's sequence logic: each engine batch is relayed once, in order; a gap asks
the replay socket from the first missing number; batches the routers cannot use are not counted.
(tests/router/test_kv_relay.py runs the same relay against vLLM's real publisher.)"""

from __future__ import annotations

import msgpack

from dynvllm.router import hashing
from dynvllm.runtime.kv_topic import KV_EVENTS
from dynvllm.worker.kv_relay import KvEventRelay, offset_port


class FakeBus:
    def __init__(self) -> None:
        self.sent: list = []

    async def publish(self, topic, batch) -> None:
        assert topic is KV_EVENTS
        self.sent.append(batch)


def _stored(i: int, parent: int | None) -> dict:
    return {
        "type": "BlockStored",
        "block_hashes": [1000 + i],
        "parent_block_hash": parent,
        "token_ids": list(range(i * 4, i * 4 + 4)),
        "block_size": 4,
        "lora_name": None,
    }


def _frames(seq: int, events: list, dp: int = 0) -> list[bytes]:
    return [b"kv", seq.to_bytes(8, "big", signed=True), msgpack.packb([float(seq), events, dp])]


def _chain(n: int) -> list[list[bytes]]:
    """Batches 0..n-1, batch i storing block i whose parent is block i-1."""
    return [_frames(i, [_stored(i, 1000 + i - 1 if i else None)]) for i in range(n)]


def _relay(replay: str | None = None) -> tuple[KvEventRelay, FakeBus]:
    bus = FakeBus()
    return KvEventRelay(bus, "w1", "tcp://127.0.0.1:1", replay), bus  # type: ignore[arg-type]


def test_offset_port_adds_the_rank():
    assert offset_port("tcp://127.0.0.1:5557", 0) == "tcp://127.0.0.1:5557"
    assert offset_port("tcp://127.0.0.1:5557", 3) == "tcp://127.0.0.1:5560"


async def test_batches_in_order_are_relayed_once_as_router_keys():
    relay, bus = _relay()
    batches = _chain(3)
    for frames in [batches[0], batches[1], batches[1], batches[0], batches[2]]:  # repeats are dropped
        await relay.handle(None, frames)
    keys = hashing.chain(list(range(12)), 4)
    assert [(b.instance_id, b.dp_rank, b.seq) for b in bus.sent] == [("w1", 0, 1), ("w1", 0, 2), ("w1", 0, 3)]
    assert [b.events for b in bus.sent] == [[["stored", [k]]] for k in keys]
    assert relay.last_engine_seq == 2 and relay.replayed == 0


async def test_a_gap_asks_the_replay_from_the_first_missing_batch():
    relay, bus = _relay("tcp://127.0.0.1:2")
    batches = _chain(6)
    asked: list[int] = []

    async def replay(ctx, start: int, upto: int = 4) -> None:  # what vLLM's replay socket returns
        asked.append(start)
        for seq in range(start, upto + 1):
            await relay._publish(batches[seq][2])
            relay.last_engine_seq = seq
            relay.replayed += 1

    relay._replay = replay  # type: ignore[method-assign]
    await relay.handle(None, batches[0])
    await relay.handle(None, batches[4])  # 1-3 were lost; 4 itself comes back through the replay
    await relay.handle(None, batches[5])
    assert asked == [1]
    assert [b.seq for b in bus.sent] == [1, 2, 3, 4, 5, 6]  # each engine batch once, in order
    assert relay.replayed == 4 and relay.last_engine_seq == 5


async def test_without_a_replay_socket_a_gap_is_passed_on():
    relay, bus = _relay(None)
    batches = _chain(3)
    await relay.handle(None, batches[0])
    await relay.handle(None, batches[2])  # 1 is lost for good: 2's parent was never seen
    assert [b.seq for b in bus.sent] == [1]
    assert relay.keys.orphans == 1 and relay.last_engine_seq == 2


async def test_batches_with_nothing_for_the_router_do_not_advance_the_relay_sequence():
    relay, bus = _relay()
    await relay.handle(None, _frames(0, [{"type": "SomethingNew"}]))
    await relay.handle(None, _frames(1, [{"type": "BlockRemoved", "block_hashes": [42]}]))  # unknown
    await relay.handle(None, _frames(2, [_stored(0, None)], dp=1))
    await relay.handle(None, _frames(3, [{"type": "AllBlocksCleared"}], dp=1))
    assert [(b.seq, b.dp_rank, b.events[0][0]) for b in bus.sent] == [(1, 1, "stored"), (2, 1, "cleared")]
    assert relay.relay_seq == 2 and relay.last_engine_seq == 3
