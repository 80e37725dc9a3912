"""When the frontend sends gathered stream output (pure)."""

from __future__ import annotations

import itertools

from dynvllm.frontend.dispatch import SendBatch


class Stream:
    def __init__(self) -> None:
        self.taken, self.waiting = 0, 0

    def queued(self) -> int:
        return self.waiting

    def read(self, arrivals: int = 0) -> None:
        """One item read while `arrivals` more came in."""
        self.taken += 1
        self.waiting += arrivals - 1


def test_an_idle_frontend_sends_each_item():
    s, batch = Stream(), SendBatch()
    for _ in range(5):
        s.waiting = 1
        s.read()
        assert batch.due(s)


def test_a_busy_frontend_sends_what_was_queued_then_the_rest_in_steps():
    """Items keep arriving faster than they are read: each batch ends at what was queued when
    it began, so the client gets steady writes instead of one at the end of the stream."""
    s, batch = Stream(), SendBatch(limit=4)
    s.waiting = 1
    s.read(arrivals=3)  # one read, three more queued meanwhile
    sends = []
    for _ in range(20):
        sends.append(batch.due(s))
        s.read(arrivals=2)  # the backlog only grows
    assert sends.index(True) == 3  # the three that were queued when the batch began, then a send
    at = [i for i, due in enumerate(sends) if due]
    assert len(at) >= 4 and all(b - a <= 5 for a, b in itertools.pairwise(at))  # <= limit + 1


def test_a_new_stream_starts_a_new_batch():
    a, b, batch = Stream(), Stream(), SendBatch()
    a.waiting = 4
    assert batch.due(a) is False
    b.waiting = 0  # the request moved to another worker (migration): nothing queued there
    assert batch.due(b) is True
    assert batch.due(None) is True
