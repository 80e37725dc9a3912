"""Frontends sharing routing decisions (pure: batches are handed over by hand, no NATS)."""

from __future__ import annotations

import random
import time

from dynvllm.frontend.routing import Router
from dynvllm.router import hashing
from dynvllm.router.policies import Load
from dynvllm.router.replicas import Outbox
from dynvllm.settings import RouterSettings

BS = 32


def _pair(**kw) -> tuple[Router, Router]:
    a, b = Router(RouterSettings(router="kv", **kw)), Router(RouterSettings(router="kv", **kw))
    a.share("a", lambda: None, silence=2.0)
    b.share("b", lambda: None, silence=2.0)
    for src, dst in ((a, b), (b, a)):  # the hellos frontends send when they start
        _send(src, dst, now=0.0, heartbeat=True)
    return a, b


def _send(src: Router, dst: Router, now: float | None = None, heartbeat: bool = False) -> list | None:
    assert src.outbox is not None and dst.peers is not None
    batch = src.outbox.batch(heartbeat=heartbeat)
    if batch is not None:
        dst.peers.apply(batch, time.monotonic() if now is None else now)
    return batch


def _route(router: Router, workers: list[str], prompt: list[int]) -> tuple[str, int]:
    pick = router.choose(workers, prompt, BS)
    return pick.worker, router.started(pick.worker, float(len(prompt) // BS), pick.rank, pick.keys)


def test_a_peers_request_counts_in_the_load_and_predictions_until_it_finishes():
    a, b = _pair()
    prompt = list(range(128))
    worker, ticket = _route(a, ["w1", "w2"], prompt)
    _send(a, b)
    assert b.load.active_blocks[worker] == a.load.active_blocks[worker] == 4
    assert b.inflight[worker] == 1
    # The prompt is on its way there: a request sharing its prefix follows it, from either side.
    pick = b.choose(["w1", "w2"], prompt[:96] + [7] * 32, BS)
    assert (pick.worker, pick.overlap) == (worker, 3)
    # Output fills blocks; the end takes the prompt and the output out again.
    a.grow(worker, None, 2, ticket)
    _send(a, b)
    assert b.load.active_blocks[worker] == 6
    a.finished(worker, 4.0, None, hashing.chain(prompt, BS), 2, ticket)
    _send(a, b)
    assert b.load.active_blocks[worker] == 0 and b.inflight[worker] == 0
    assert not any(b.load.held.values())


def test_replicas_that_share_choose_alike_and_those_that_do_not_drift_apart():
    """Two frontends take turns with a shared-prefix load over four workers; each time, both are
    asked where the next request would go. Shared: they always agree."""
    rng = random.Random(5)
    workers = ["w1", "w2", "w3", "w4"]
    systems = [[rng.randrange(3, 500) for _ in range(320)] for _ in range(6)]

    def run(share: bool) -> float:
        a, b = _pair() if share else (Router("kv"), Router("kv"))
        inflight: list[tuple[Router, str, float, list[int], int]] = []
        agree = 0
        for i in range(200):
            prompt = systems[rng.randrange(6)] + [rng.randrange(3, 500) for _ in range(64)]
            agree += a.choose(workers, prompt, BS).worker == b.choose(workers, prompt, BS).worker
            side = (a, b)[i % 2]
            worker, ticket = _route(side, workers, prompt)
            inflight.append((side, worker, 12.0, hashing.chain(prompt, BS), ticket))
            if len(inflight) > 8:
                r, w, blocks, keys, t = inflight.pop(0)
                r.finished(w, blocks, None, keys, 0, t)
            if share:
                _send(a, b)
                _send(b, a)
        return agree / 200

    assert run(share=True) == 1.0
    assert run(share=False) < 0.9


def test_a_peer_that_leaves_or_falls_silent_takes_its_load_and_predictions_along():
    a, b = _pair()
    prompt = list(range(128))
    keys = hashing.chain(prompt, BS)
    worker, _ = _route(a, ["w1"], prompt)
    _send(a, b, now=10.0)
    assert b.index is not None and b.index.overlaps(keys) == {(worker, 0): 4}
    assert b.peers is not None
    assert b.peers.expire(11.0) == [] and "a" in b.peers
    assert b.peers.expire(12.5) == ["a"]
    assert b.load.active_blocks[worker] == 0 and b.inflight[worker] == 0
    assert b.index.overlaps(keys) == {}  # its prediction withdrawn
    # A goodbye does the same at once; events that confirmed the blocks keep them.
    worker, _ = _route(a, ["w1"], prompt)
    _send(a, b, now=20.0)
    b.index.apply((worker, 0), ("stored", keys[:2]))
    assert a.outbox is not None
    b.peers.apply(a.outbox.batch(bye=True), 20.5)
    assert "a" not in b.peers and b.load.active_blocks[worker] == 0
    assert b.index.overlaps(keys) == {(worker, 0): 2}


def test_a_heartbeat_prunes_requests_whose_end_was_lost():
    a, b = _pair()
    w1, t1 = _route(a, ["w1"], list(range(64)))
    _route(a, ["w1"], list(range(1000, 1064)))
    _send(a, b)
    assert b.inflight["w1"] == 2
    a.finished(w1, 2.0, None, hashing.chain(list(range(64)), BS), 0, t1)
    a.outbox.batch()  # lost on the way
    _send(a, b, heartbeat=True)
    assert b.peers is not None and b.peers.gaps == 1
    assert b.inflight["w1"] == 1 and b.load.active_blocks["w1"] == 2


def test_batches_lost_both_ways_are_mended_by_the_side_that_sees_the_gap():
    """A NATS outage: each side's started records are lost; the first batch after it shows the
    receiver a gap, and the receiver sends its own requests in flight again."""
    a, b = _pair()
    _route(a, ["w1"], list(range(64)))
    _route(b, ["w2"], list(range(1000, 1064)))
    a.outbox.batch()  # both lost on the way
    b.outbox.batch()
    assert a.inflight.get("w2", 0) == 0 and b.inflight.get("w1", 0) == 0
    _send(b, a, heartbeat=True)  # b is back first: a sees the gap
    assert a.peers is not None and a.peers.gaps == 1
    assert a.inflight.get("w2", 0) == 0  # a heartbeat does not bring a lost start back ...
    _send(a, b)  # ... but a, seeing the gap, sends its own requests again: b counts them
    assert b.inflight["w1"] == 1
    _send(b, a)  # and b, seeing a's gap in turn, sends its own
    assert a.inflight["w2"] == 1
    assert a.outbox.batch() is None  # and no more: sequences run on without gaps


def test_a_worker_that_leaves_is_forgotten_with_the_peers_requests_on_it():
    a, b = _pair()
    worker, ticket = _route(a, ["w1"], list(range(64)))
    _send(a, b)
    b.forget("w1")
    a.finished(worker, 2.0, None, hashing.chain(list(range(64)), BS), 0, ticket)
    _send(a, b)
    assert b.inflight.get("w1", 0) == 0 and b.load.active_blocks.get("w1", 0) == 0


def test_own_batches_are_ignored_and_an_untracked_finish_still_reaches_peers():
    a, b = _pair()
    worker, _ = _route(a, ["w1"], list(range(64)))
    assert a.outbox is not None and a.peers is not None
    own = a.outbox.batch()
    a.peers.apply(own, 0.0)  # its own batch, echoed back by NATS
    assert a.inflight["w1"] == 1
    b.peers.apply(own, 0.0)
    # A caller that kept no ticket: the outbox finds the request by worker and keys.
    a.finished(worker, 2.0, None, hashing.chain(list(range(64)), BS))
    _send(a, b)
    assert b.inflight["w1"] == 0 and not a.outbox.open


def test_the_outbox_wakes_its_publisher_once_per_batch():
    woken = []
    box = Outbox("r", lambda: woken.append(1))
    t1 = box.started("w", 0, 2.0, [1, 2])
    box.started("w", 0, 2.0, [3])
    box.finished(t1)
    assert len(woken) == 1
    replica, seq, records, open_, bye = box.batch(heartbeat=True)
    assert (replica, seq, open_, bye) == ("r", 1, [2], False)
    assert [r[0] for r in records] == [0, 0, 1]
    assert box.batch() is None
    box.grew(2, 1)
    assert len(woken) == 2 and box.batch()[2] == [[2, 2, 1]]


def test_a_lone_frontend_publishes_heartbeats_only_and_a_newcomer_learns_what_is_in_flight():
    a = Router(RouterSettings(router="kv"))
    woken: list[int] = []
    a.share("a", lambda: woken.append(1), silence=2.0)
    assert a.outbox is not None
    w1, t1 = _route(a, ["w1"], list(range(64)))
    a.grow(w1, None, 3, t1)
    _route(a, ["w1"], list(range(1000, 1064)))
    assert not woken and a.outbox.batch() is None  # nothing to publish per request
    # A second frontend starts: its hello reaches the first, which sends what it has in flight.
    b = Router(RouterSettings(router="kv"))
    b.share("b", lambda: None, silence=2.0)
    _send(b, a, now=0.0, heartbeat=True)
    _send(a, b, now=0.0)
    assert b.inflight["w1"] == 2
    assert b.load.active_blocks["w1"] == 2 + 3 + 2  # both prompts' blocks and the first's output
    assert b.load.contexts == a.load.contexts == {"w1": 2 + 3 + 2}
    # A third joins: the records are sent again; the second skips those it knows.
    c = Router(RouterSettings(router="kv"))
    c.share("c", lambda: None, silence=2.0)
    _send(c, a, now=0.0, heartbeat=True)
    batch = _send(a, b, now=0.0)
    assert batch is not None and c.peers is not None
    c.peers.apply(batch, 0.0)
    assert b.inflight["w1"] == 2 and c.inflight["w1"] == 2
    # Alone again: records stop.
    assert a.peers is not None
    a.peers.drop("b")
    a.peers.drop("c")
    _route(a, ["w1"], list(range(2000, 2064)))
    assert a.outbox.batch() is None


def test_a_peers_request_for_the_same_prompt_does_not_turn_a_frontend_elsewhere():
    """The same prompt reaches two frontends at once; the second hears of the first's choice
    before it chooses. That request's blocks are ones the prompt would share on its worker, so they
    do not count against it there: both choose alike whichever heard first. Counting them as load
    sent the second frontend to the other worker holding the system prompt. (At weight 1 with no
    decode weight: a higher prefill weight favours w1 by its two uncached blocks alone.)"""
    a, b = _pair(router_prefill_weight=1, router_decode_weight=0)
    system = list(range(10_000, 10_000 + 12 * BS))
    prompt = system + list(range(2 * BS))  # 14 blocks, the first 12 cached on both workers
    for r in (a, b):
        assert r.index is not None
        for w in ("w1", "w2"):
            r.index.apply((w, 0), ("stored", hashing.chain(system, BS)))
    # Requests of other prompts in flight: w2 a little busier than w1.
    a.started("w1", 14.0, None, hashing.chain(list(range(14 * BS)), BS))
    a.started("w2", 16.0, None, hashing.chain(list(range(50_000, 50_000 + 16 * BS)), BS))
    _send(a, b)
    assert b.load.active_blocks == {"w1": 14, "w2": 16}
    worker, _ = _route(a, ["w1", "w2"], prompt)
    assert worker == "w1"
    _send(a, b)
    assert b.load.active_blocks["w1"] == 28  # the peer's copy, all of its 14 blocks new there
    pick = b.choose(["w1", "w2"], prompt, BS)
    assert (pick.worker, pick.overlap) == ("w1", 14)


def test_the_load_a_prompt_meets_leaves_out_the_blocks_it_would_share():
    router = Router(RouterSettings(router="kv", router_decode_weight=0))
    load = router.load
    prompt = hashing.chain(list(range(6 * BS)), BS)
    load.add("w1", 0, 4.0, prompt[:4])
    load.add("w1", 0, 3.0, prompt[:2] + [7])
    load.add("w2", 0, 5.0, [8, 9] + prompt[2:5])  # shares keys but not the prefix: no chain
    assert dict(load.active_blocks) == {"w1": 5, "w2": 5}
    assert load.others(prompt, load.active_blocks, False) == {"w1": 1, "w2": 5}
    assert load.others(prompt, load.rank_blocks, True) == {("w1", 0): 1, ("w2", 0): 5}
    assert load.load(prompt, False, True) == {"w1": 1, "w2": 5}
    assert load.load(prompt, True, False) is load.rank_blocks
    # With a decode weight, the shared prefix counts in each request's context (4 + 3 blocks on
    # w1); w2's requests share nothing, so their contexts are its distinct blocks and its load
    # does not move.
    for weight in (0.5, 1.0):
        weighted = Load(decode_weight=weight)
        weighted.add("w1", 0, 4.0, prompt[:4])
        weighted.add("w1", 0, 3.0, prompt[:2] + [7])
        weighted.add("w2", 0, 5.0, [8, 9] + prompt[2:5])
        w1 = (1 - weight) * 1 + weight * 7  # distinct less the prompt's 2 shared, contexts 4 + 3
        assert weighted.load(prompt, False, True) == {"w1": w1, "w2": 5}
        assert weighted.load(prompt, True, True) == {("w1", 0): w1, ("w2", 0): 5}
        weighted.count("w2", 0, 2.0)  # output: its own blocks, one context's
        assert weighted.load(prompt, False, False) == {"w1": (1 - weight) * 5 + weight * 7, "w2": 7}
        weighted.remove("w1", 0, 4.0, prompt[:4])
        weighted.remove("w1", 0, 3.0, prompt[:2] + [7])
        weighted.forget("w2")
        assert not any(weighted.blended.values()) and not any(weighted.rank_blended.values())
    assert load.others([1, 2], load.active_blocks, False) is load.active_blocks
    load.remove("w1", 0, 4.0, prompt[:4])
    assert load.others(prompt, load.active_blocks, False) == {"w1": 3 - 2, "w2": 5}
    load.remove("w1", 0, 3.0, prompt[:2] + [7])
    load.forget("w2")
    assert not load.starts and not any(load.held.values())
    # Without predictions (events only), a request in flight does not count as cached anywhere.
    events_only = Router(RouterSettings(router="kv", router_predict_ttl=0))
    events_only.started("w1", 6.0, None, prompt)
    assert events_only.choose(["w1", "w2"], list(range(6 * BS)), BS).worker == "w2"


def test_a_finished_record_waits_for_the_next_batch_and_the_sender_counts_the_request_till_then():
    """A batch costs its receivers far more than its records, so a finished record does not send
    one of its own: it rides with the next started record, or goes after `linger`. Until it goes
    out, the sender itself still counts the request, as its peers do."""
    a, b = _pair()
    _send(a, b)  # its greeting to b, answering b's hello
    woken: list[str] = []
    assert a.outbox is not None
    a.outbox.wake = lambda: woken.append("now")
    a.outbox.wake_later = lambda delay: woken.append(f"in {delay}")
    a.outbox.linger = 0.05
    prompt = list(range(128))
    worker, ticket = _route(a, ["w1"], prompt)
    assert woken == ["now"]
    _send(a, b)
    a.finished(worker, 4.0, None, hashing.chain(prompt, BS), 0, ticket)
    assert woken == ["now", "in 0.05"]  # no batch of its own yet
    assert a.inflight[worker] == b.inflight[worker] == 1
    assert a.load.active_blocks[worker] == b.load.active_blocks[worker] == 4
    # The next request's start sends both records, and both frontends count alike again.
    other = list(range(1000, 1064))
    _route(a, ["w1"], other)
    assert woken == ["now", "in 0.05", "now"]
    batch = _send(a, b)
    assert batch is not None and [r[0] for r in batch[2]] == [1, 0]
    assert a.inflight[worker] == b.inflight[worker] == 1
    assert a.load.active_blocks[worker] == b.load.active_blocks[worker] == 2
    # A lone finish goes when its timer fires (the publisher then asks for a batch).
    a.finished(worker, 2.0, None, hashing.chain(other, BS), 0, 2)
    assert a.inflight[worker] == 1 and woken[-1] == "in 0.05"
    _send(a, b)
    assert a.inflight[worker] == b.inflight[worker] == 0
    assert a.load.active_blocks[worker] == b.load.active_blocks[worker] == 0


def test_a_frontend_without_peers_takes_a_finished_request_out_at_once():
    a = Router(RouterSettings(router="kv"))
    a.share("a", lambda: None, silence=2.0, wake_later=lambda delay: None)
    worker, ticket = _route(a, ["w1"], list(range(64)))
    a.finished(worker, 2.0, None, hashing.chain(list(range(64)), BS), 0, ticket)
    assert a.inflight[worker] == 0 and a.load.active_blocks[worker] == 0
    # With a peer, finished requests wait for their record; the peer leaving lets them go.
    b = Router(RouterSettings(router="kv"))
    b.share("b", lambda: None, silence=2.0)
    _send(b, a, now=0.0, heartbeat=True)
    worker, ticket = _route(a, ["w1"], list(range(64)))
    a.finished(worker, 2.0, None, hashing.chain(list(range(64)), BS), 0, ticket)
    assert a.inflight[worker] == 1
    assert a.peers is not None
    a.peers.drop("b")
    assert a.inflight[worker] == 0 and a.load.active_blocks[worker] == 0
    assert a.outbox is not None and a.outbox.records == []


def test_a_peers_output_growth_is_taken_back_with_its_request_or_its_worker():
    a, b = _pair()
    w, t1 = _route(a, ["w1"], list(range(64)))
    _, t2 = _route(a, ["w1"], list(range(1000, 1064)))
    a.grow(w, None, 3, t1)
    a.grow(w, None, 1, t2)
    a.grow(w, None, 2, t1)
    _send(a, b)
    assert b.load.active_blocks[w] == 2 + 2 + 6
    a.finished(w, 2.0, None, hashing.chain(list(range(64)), BS), 5, t1)
    _send(a, b)
    assert b.load.active_blocks[w] == a.load.active_blocks[w] == 2 + 1
    b.forget(w)
    assert b.peers is not None
    a.finished(w, 2.0, None, hashing.chain(list(range(1000, 1064)), BS), 1, t2)
    _send(a, b)
    assert b.inflight.get(w, 0) == 0 and b.load.active_blocks.get(w, 0) == 0


def test_output_growth_rides_with_the_next_start_and_counts_for_the_sender_when_it_goes():
    a, b = _pair()
    _send(a, b)
    woken: list[str] = []
    assert a.outbox is not None
    a.outbox.wake = lambda: woken.append("now")
    a.outbox.wake_later = lambda delay: woken.append("later")
    w, t1 = _route(a, ["w1"], list(range(64)))
    _send(a, b)
    a.grow(w, None, 3, t1)
    a.grow(w, None, 1, t1)
    assert woken == ["now", "later"]  # one timer for the batch, no batch of their own
    assert a.load.active_blocks[w] == b.load.active_blocks[w] == 2
    _route(a, ["w1"], list(range(1000, 1064)))
    batch = _send(a, b)
    assert batch is not None and [r[0] for r in batch[2]] == [2, 2, 0]
    assert a.load.active_blocks[w] == b.load.active_blocks[w] == 2 + 4 + 2


def test_a_record_lingers_only_while_a_start_is_likely_to_take_it_along():
    """A lingering record that no start takes along costs its publisher a timer wake-up of its
    own, and one that rides saves each peer a batch: it lingers while starts come often enough
    (the more peers, the less often they need come)."""
    now = [0.0]
    woken: list[str] = []
    box = Outbox(
        "r", lambda: woken.append("now"), wake_later=lambda d: woken.append("later"), clock=lambda: now[0]
    )
    box.linger, box.peers = 0.02, 1
    tickets = []
    for i in range(5):  # a start every 10 ms
        now[0] = i * 0.01
        tickets.append(box.started("w", 0, 2.0, [i]))
    box.batch()
    woken.clear()
    now[0] = 0.045
    box.finished(tickets[0])  # a start is likely within 20 ms: waits for it
    assert woken == ["later"]
    box.batch()
    now[0] = 0.5
    box.finished(tickets[1])  # quiet for 460 ms: goes on the publisher's next turn
    assert woken == ["later", "now"]
    assert [r[0] for r in box.batch()[2]] == [1]
    # Starts 100 ms apart: not worth it for one peer (one saved batch), worth it for seven.
    for i in range(20):
        now[0] = 1 + i * 0.1
        tickets.append(box.started("w", 0, 2.0, [i]))
    box.batch()
    woken.clear()
    now[0] += 0.05
    box.finished(tickets[2])
    box.batch()
    box.peers = 7
    box.finished(tickets[3])
    assert woken == ["now", "later"]


def test_peers_joining_at_once_get_each_request_in_flight_once():
    a, _ = _pair()
    for i in range(10):
        _route(a, ["w1"], list(range(100 * i, 100 * i + 64)))
    assert a.outbox is not None
    a.outbox.batch()
    for peers in (2, 3, 4):  # three peers join (or show gaps) before the next batch goes
        a.outbox.peers_changed(peers, joined=True)
    batch = a.outbox.batch()
    assert batch is not None
    tickets = [r[1] for r in batch[2]]
    assert sorted(tickets) == sorted(a.outbox.open) and len(tickets) == 10


def test_a_batch_over_the_limit_goes_as_numbered_parts_that_peers_apply_alike():
    import msgpack

    a, b = _pair()
    c = Router(RouterSettings(router="kv"))
    c.share("c", lambda: None, silence=2.0)
    assert a.outbox is not None and b.peers is not None and c.peers is not None
    hello = a.outbox.batch(heartbeat=True)  # c hears of a as b does
    b.peers.apply(hello, 0.0)
    c.peers.apply(hello, 0.0)
    for i in range(40):
        _route(a, ["w1", "w2"], [7] * 5 + list(range(1000 * i, 1000 * i + 600)))
    batch = a.outbox.batch(heartbeat=True)
    assert batch is not None
    whole = len(msgpack.packb(batch))
    parts = a.outbox.split(batch, whole // 5, lambda x: len(msgpack.packb(x)))
    assert len(parts) >= 5 and all(len(msgpack.packb(p)) <= whole // 5 for p in parts)
    assert [p[1] for p in parts] == list(range(batch[1], batch[1] + len(parts)))
    assert [r for p in parts for r in p[2]] == batch[2]  # every record, in order
    assert [p[3:] for p in parts] == [[None, False]] * (len(parts) - 1) + [batch[3:]]
    for p in parts:
        b.peers.apply(p, 0.0)
    c.peers.apply(batch, 0.0)
    assert b.peers.gaps == 0 and dict(b.inflight) == dict(c.inflight) and sum(b.inflight.values()) == 40
    assert dict(b.load.active_blocks) == dict(c.load.active_blocks)
    nxt = a.outbox.batch(heartbeat=True)  # numbering goes on after the parts
    assert nxt is not None and nxt[1] == parts[-1][1] + 1
    # A record that alone is over the limit cannot go; the rest do.
    small = a.outbox.split(batch, 2000, lambda x: len(msgpack.packb(x)))
    assert all(r not in [q for p in small for q in p[2]] for r in batch[2] if len(msgpack.packb(r)) > 1980)
