"""The stream protocol as pure state: no socket, no event loop."""

from __future__ import annotations

import msgpack
import pytest

from dynvllm.runtime.errors import BadRequest, RemoteError
from dynvllm.runtime.wire import (
    CALL,
    CANCEL,
    CREDIT,
    DATA,
    END,
    ERROR,
    ClientWire,
    ProtocolError,
    ServerWire,
)


def test_a_call_round_trips_through_both_sides():
    client, server = ClientWire(window=4), ServerWire(window=4)
    sid, frame = client.call("generate", {"token_ids": [1, 2]})
    assert server.receive(frame) == [[CALL, sid, "generate", {"token_ids": [1, 2]}]]
    out = client.receive(server.data(sid, {"t": 1}) + server.end(sid))
    assert out == [[DATA, sid, {"t": 1}], [END, sid]]
    assert not server.is_open(sid) and client.cancel(sid) is None  # nothing left to cancel


def test_frames_split_at_every_byte_boundary_decode_the_same():
    server = ServerWire()
    client = ClientWire()
    sid, call = client.call("e", list(range(50)))
    blob = call + msgpack.packb([CREDIT, sid, 3]) + msgpack.packb([CANCEL, sid])
    for cut in range(len(blob) + 1):
        s = ServerWire()
        events = s.receive(blob[:cut]) + s.receive(blob[cut:])
        assert events == [[CALL, sid, "e", list(range(50))], [CREDIT, sid], [CANCEL, sid]]
    assert server.receive(call)[0][0] == CALL


def test_credits_bound_what_the_server_may_send():
    client, server = ClientWire(window=4), ServerWire(window=4)
    sid, frame = client.call("count", None)
    server.receive(frame)
    sent = []
    while server.can_send(sid):
        sent.append(server.data(sid, len(sent)))
    assert len(sent) == 4 and server.data(sid, "more") is None
    assert client.half_window == 2
    credits = [client.credit(sid, 2), client.credit(sid, 2)]  # a consumer returns half windows
    assert server.receive(b"".join(credits)) == [[CREDIT, sid], [CREDIT, sid]]
    assert server.credits[sid] == 4


def test_cancel_closes_the_stream_on_both_sides():
    client, server = ClientWire(), ServerWire()
    sid, frame = client.call("forever", None)
    server.receive(frame)
    cancel = client.cancel(sid)
    assert cancel is not None and client.cancel(sid) is None
    assert server.receive(cancel) == [[CANCEL, sid]]
    assert not server.can_send(sid) and not server.is_open(sid)
    assert server.receive(cancel) == []  # a second cancel of a closed stream is no event
    assert client.receive(msgpack.packb([DATA, sid, 1])) == []  # late data is dropped


def test_errors_arrive_typed():
    client, server = ClientWire(), ServerWire()
    sid, frame = client.call("generate", None)
    server.receive(frame)
    [[op, got_sid, exc]] = client.receive(server.error(sid, "BadRequest", "prompt is too long"))
    assert (op, got_sid) == (ERROR, sid) and isinstance(exc, BadRequest)
    assert exc.message == "prompt is too long"
    sid2, frame = client.call("x", None)
    server.receive(frame)
    [[_, _, other]] = client.receive(server.error(sid2, "KeyError", "boom"))
    assert type(other) is RemoteError and other.kind == "KeyError"


@pytest.mark.parametrize(
    "frame",
    [
        msgpack.packb("hello"),
        msgpack.packb([CALL]),
        msgpack.packb([CALL, "sid", "e", None]),
        msgpack.packb([CALL, 1, 7, None]),
        msgpack.packb([CREDIT, 1, -3]),
        msgpack.packb([99, 1]),
        b"\xc1",  # a byte msgpack never uses
    ],
)
def test_malformed_frames_are_protocol_errors(frame):
    with pytest.raises(ProtocolError):
        ServerWire().receive(frame)


def test_a_stream_id_cannot_be_opened_twice():
    server = ServerWire()
    server.receive(msgpack.packb([CALL, 1, "e", None]))
    with pytest.raises(ProtocolError, match="already open"):
        server.receive(msgpack.packb([CALL, 1, "e", None]))


def test_close_reports_open_streams():
    client, server = ClientWire(), ServerWire()
    a, fa = client.call("e", None)
    b, fb = client.call("e", None)
    server.receive(fa + fb)
    server.receive(server.end(a) and b"")
    assert server.close() == [b]
    assert sorted(client.close()) == [a, b]
