"""The on-demand NATS subscription: its frame parser alone, then against a real nats-server
(messages in order at any size, the server's pings answered, auth, a lost server)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import nats
import pytest

from dynvllm.runtime.nats_pull import ERR, INFO, MSG, PING, PONG, Frames, Pulled, Server
from tests.helpers import NatsServer, free_port

STREAM = (
    b'INFO {"server_id":"x","max_payload":1048576}\r\n'
    b"+OK\r\n"
    b"MSG a.b 1 6\r\nPING\r\n\r\n"  # a payload that looks like a frame
    b"PING\r\n"
    b"HMSG a.c 1 r.x 12 17\r\nNATS/1.0\r\n\r\nhello\r\n"
    b"MSG a.d 1 0\r\n\r\n"
    b"PONG\r\n"
    b"-ERR 'Stale Connection'\r\n"
)
WANT = [(INFO, '{"server_id":"x","max_payload":1048576}'), (MSG, "a.b", b"PING\r\n"), (PING,)]
WANT += [(MSG, "a.c", b"hello"), (MSG, "a.d", b""), (PONG,)]
WANT.append((ERR, "Stale Connection"))


def test_frames_from_a_stream_cut_anywhere():
    assert Frames().feed(STREAM) == WANT
    for cut in range(1, len(STREAM)):
        frames = Frames()
        assert frames.feed(STREAM[:cut]) + frames.feed(STREAM[cut:]) == WANT, cut
    frames = Frames()
    assert [f for b in range(len(STREAM)) for f in frames.feed(STREAM[b : b + 1])] == WANT


def test_a_malformed_message_line_is_an_error():
    with pytest.raises(ValueError, match="malformed"):
        Frames().feed(b"MSG a.b\r\nxx\r\n")


def test_server_urls():
    assert Server.parse("nats://u:p@h:4223") == Server("h", 4223, "u", "p", False)
    assert Server.parse("h2") == Server("h2", 4222)
    assert Server.parse("tls://h:1").tls and Server.parse("ws://h:1").tls


@pytest.fixture
def server(tmp_path):
    s = NatsServer(tmp_path, config='ping_interval: "200ms"\nping_max: 2\n')
    yield s
    s.stop()


async def _read_until(pulled: Pulled, count: int, timeout: float = 5.0) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"got {len(got)} of {count}"
        got += pulled.read()
        await asyncio.sleep(0.01)
    return got


def test_messages_arrive_in_order_only_when_read_and_pings_are_answered(server):
    async def main() -> None:
        pub = await nats.connect(server.url)
        await pub.publish("d.before", b"not subscribed yet")
        pulled = await Pulled.open([server.url], "d.*")
        try:
            assert pulled.read() == []
            sent = [(f"d.{i % 3}", bytes([i % 251]) * (i * 7919 % 400_000)) for i in range(60)]
            for subject, data in sent:
                await pub.publish(subject, data)
            await pub.flush()
            assert await _read_until(pulled, len(sent)) == sent
            assert pulled.read() == []
            # Read now and then for longer than the server waits for pongs: still connected.
            for _ in range(12):
                await asyncio.sleep(0.1)
                assert pulled.read() == []
            await pub.publish("d.x", b"still here")
            await pub.flush()
            assert await _read_until(pulled, 1) == [("d.x", b"still here")]
        finally:
            pulled.close()
            await pub.close()

    asyncio.run(main())


def test_publishes_in_order_past_a_full_socket_and_hears_no_echo(server):
    async def main() -> None:
        sub_nc = await nats.connect(server.url)
        sub = await sub_nc.subscribe("d.*")
        await sub_nc.flush()
        pulled = await Pulled.open([server.url], "d.*")
        try:
            # More than the socket takes at once: the rest goes as it drains, in order.
            sent = [(f"d.{i}", bytes([i]) * (i * 104_729 % 900_000)) for i in range(24)]
            for subject, data in sent:
                pulled.publish(subject, data)
            await pulled.flush(timeout=10)
            got = [await sub.next_msg(timeout=10) for _ in sent]
            assert [(m.subject, m.data) for m in got] == sent
            await asyncio.sleep(0.2)
            assert pulled.read() == []  # its own messages do not come back to it
        finally:
            pulled.close()
            await sub_nc.close()

    asyncio.run(main())


def test_a_subscription_never_read_is_dropped_by_the_server_and_says_so(server):
    """The control for the pings above: unread, nobody answers them and the server gives up."""

    async def main() -> None:
        pulled = await Pulled.open([server.url], "d.*")
        await asyncio.sleep(1.5)
        with pytest.raises(ConnectionError, match=r"Stale Connection|closed"):
            pulled.read()
        assert pulled.closed

    asyncio.run(main())


def test_auth_and_a_lost_server(tmp_path):
    s = NatsServer(tmp_path, "--auth", "s3cret")
    try:

        async def main() -> None:
            with pytest.raises(ConnectionError, match="Authorization Violation"):
                await Pulled.open([s.url], "d.*", token="wrong")
            with pytest.raises(ConnectionError):  # no server listens there
                await Pulled.open([f"nats://127.0.0.1:{free_port()}"], "d.*", token="s3cret")
            pulled = await Pulled.open([f"nats://127.0.0.1:{free_port()}", s.url], "d.*", token="s3cret")
            pub = await nats.connect(s.url, token="s3cret")
            await pub.publish("d.1", b"x")
            await pub.flush()
            assert await _read_until(pulled, 1) == [("d.1", b"x")]
            await pub.close()
            s.stop()
            with pytest.raises(ConnectionError):
                await _read_until(pulled, 1)
            assert pulled.closed

        asyncio.run(main())
    finally:
        if s.proc.poll() is None:
            s.stop()


def test_a_refused_publish_is_said_and_the_connection_lives_on(tmp_path):
    config = (
        'authorization { users = [ {user: a, password: b, permissions: {publish: {deny: ["d.no"]}}} ] }\n'
    )
    s = NatsServer(tmp_path, config=config)
    try:

        async def main() -> None:
            # The settings' user and password, or the URL's.
            with pytest.raises(ConnectionError, match="Authorization Violation"):
                await Pulled.open([s.url], "d.*", user="a", password="wrong")
            (await Pulled.open([s.url], "d.*", user="a", password="b")).close()
            pulled = await Pulled.open([f"nats://a:b@127.0.0.1:{s.port}"], "d.*")
            try:
                pulled.publish("d.no", b"refused")
                pulled.publish("d.yes", b"taken")
                await pulled.flush()
                pub = await nats.connect(s.url, user="a", password="b")
                await pub.publish("d.1", b"after")
                await pub.flush()
                assert await _read_until(pulled, 1) == [("d.1", b"after")]
                assert "Permissions Violation" in pulled.error and not pulled.closed
                await pub.close()
            finally:
                pulled.close()

        asyncio.run(main())
    finally:
        s.stop()


def test_a_message_over_max_payload_is_refused_here_and_the_connection_lives_on(tmp_path):
    s = NatsServer(tmp_path, config="max_payload: 4096\n")
    try:

        async def main() -> None:
            pulled = await Pulled.open([s.url], "d.*")
            try:
                assert pulled.max_payload == 4096
                with pytest.raises(ValueError, match="max_payload"):
                    pulled.publish("d.big", b"x" * 5000)
                pub = await nats.connect(s.url)
                await pub.publish("d.1", b"y" * 4096)
                await pub.flush()
                assert await _read_until(pulled, 1) == [("d.1", b"y" * 4096)]
                await pub.close()
            finally:
                pulled.close()

        asyncio.run(main())
    finally:
        s.stop()


def test_pings_answered_keep_it_and_a_server_that_stops_answering_is_given_up(tmp_path):
    s = NatsServer(tmp_path)
    try:

        async def main() -> None:
            pulled = await Pulled.open([s.url], "d.*")

            async def answered() -> None:
                deadline = time.monotonic() + 10
                while pulled.unanswered:
                    assert time.monotonic() < deadline, "no PONG"
                    await asyncio.sleep(0.01)
                    pulled.read()

            try:
                for _ in range(6):  # answered: the count starts again each time
                    pulled.ping()
                    assert pulled.unanswered == 1
                    await answered()
                os.kill(s.proc.pid, signal.SIGSTOP)  # the connection stands, nothing answers
                try:
                    await asyncio.sleep(0.1)
                    for _ in range(3):
                        pulled.ping()
                        await asyncio.sleep(0.05)
                        assert pulled.read() == []
                    with pytest.raises(ConnectionError, match="none of 3 pings"):
                        pulled.ping()
                    assert pulled.closed
                finally:
                    os.kill(s.proc.pid, signal.SIGCONT)
            finally:
                pulled.close()

        asyncio.run(main())
    finally:
        s.stop()
