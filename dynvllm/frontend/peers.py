"""Frontends of one namespace as peers over NATS: each publishes its routing decisions and applies
the others' (`dynvllm.router.replicas`), and a starting frontend loads a live peer's block index
before it serves (`dynvllm.router.snapshot`). This module is the I/O; the logic is pure there.

Subjects under the namespace:
    router.decisions.<replica>   a frontend's decision batches (every frontend listens to all,
                                 over a connection read only when it routes and every
                                 `pull_interval`: `dynvllm.runtime.nats_pull`, or over nats-py
                                 where that cannot connect, TLS)
    router.snapshot              request/reply, one answering frontend (a queue group): the
                                 index as chunked messages to the requester's inbox
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

import msgpack

from dynvllm.frontend.routing import Router
from dynvllm.router import snapshot as snap
from dynvllm.runtime import nats as natsrt
from dynvllm.runtime.events import EventBus
from dynvllm.runtime.kv_topic import KV_EVENTS
from dynvllm.runtime.nats_pull import Pulled, Unsupported
from dynvllm.settings import RuntimeSettings

log = logging.getLogger("dynvllm.frontend.peers")
_NO_RESPONDERS = "503"
#: Bytes of snapshot sent between flushes: the client's outgoing buffer stays well under its limit.
_FLUSH_EVERY = 4 << 20


def _packed_size(obj: Any) -> int:
    return len(msgpack.packb(obj))


class RouterPeers:
    def __init__(
        self,
        nc: Any,
        rt: RuntimeSettings,
        router: Router,
        snapshot_timeout: float = 3.0,
        min_interval: float = 0.002,
        pull_interval: float = 0.2,
        ping_interval: float = 5.0,
    ) -> None:
        """`nc`: the frontend's connection (KV events, snapshots); decisions get their own."""
        self.nc, self.rt, self.router = nc, rt, router
        namespace = self.namespace = rt.namespace
        #: A heartbeat batch every heartbeat interval; a peer silent for a lease is gone.
        self.heartbeat, self.silence = rt.heartbeat_interval, rt.lease_ttl
        self.snapshot_timeout = snapshot_timeout
        #: Seconds between decision batches at least (see `_publish`).
        self.min_interval = min_interval
        #: Seconds between reads of the peers' decisions while this frontend routes none (a
        #: routing decision reads them first): a slow timer keeps the buffers short.
        self.pull_interval = pull_interval
        #: Seconds between pings of the on-demand connection (3 unanswered: reconnect), as the
        #: frontend's nats-py connections ping.
        self.ping_interval = ping_interval
        self._dnc: Any = None
        #: The decisions' subscription read on demand (None: nats-py delivers them).
        self._pulled: Pulled | None = None
        self.replica = secrets.token_hex(6)
        self._decisions = f"{namespace}.router.decisions"
        self._own = f"{self._decisions}.{self.replica}"
        self._snapshot_subject = f"{namespace}.router.snapshot"
        self._wake = asyncio.Event()
        #: The timer of a batch that waits for more records (`Outbox.linger`).
        self._later: asyncio.TimerHandle | None = None
        #: The second announcement after a reconnection (see `_pull_loop`).
        self._again: asyncio.TimerHandle | None = None
        self._beat_due = False
        self._subs: list[Any] = []
        self._tasks: list[asyncio.Task] = []
        #: Peer batches that could not be read or applied (logged first, then every 1000th).
        self.dropped = 0
        #: How the index started: blocks loaded from a peer and seconds it took (None: cold).
        self.bootstrap: tuple[int, float] | None = None

    async def start(self, share: bool) -> None:
        """Share decisions (with `share`); for a policy that follows KV events, subscribe to them
        and load a peer's index, then answer later frontends' snapshot requests."""
        router = self.router
        if share:
            self._pulled = await self._open_pull()
            router.share(self.replica, self._wake.set, self.silence, self._wake_later)
            if self._pulled is not None:
                router.pull = self.pull
                self._tasks.append(asyncio.create_task(self._pull_loop()))
            else:
                # No echo: at a batch per few ms, its own batches coming back would cost this
                # frontend as much again as its peers' do.
                self._dnc = await natsrt.connect(self.rt, name="dynvllm-frontend-decisions", no_echo=True)
                self._subs.append(await self._dnc.subscribe(self._decisions + ".*", cb=self._on_decisions))
            self._tasks.append(asyncio.create_task(self._publish()))
            self._tasks.append(asyncio.create_task(self._beat()))
            # Said at once, not a heartbeat later: peers learn of this frontend before it routes.
            self._beat_due = True
            self._wake.set()
        if not router.policy.uses_kv_events:
            return
        router.begin_bootstrap()
        loaded: snap.Snapshot | None = None
        t0 = time.monotonic()
        try:
            # Subscribed before asking: every batch newer than the peer's snapshot is buffered.
            await EventBus(self.nc, self.namespace).subscribe(KV_EVENTS, router.on_kv_events)
            loaded = await self._fetch()
        finally:
            for _ in router.end_bootstrap_steps(loaded):
                await asyncio.sleep(0)
        if loaded is not None and loaded.workers:  # an empty one: the peer started cold too
            self.bootstrap = (loaded.blocks, time.monotonic() - t0)
            # Said at the level start-up facts are (frontends log warnings and up).
            log.warning(
                "router index loaded from a peer frontend: %d blocks on %d workers in %.3f s",
                loaded.blocks,
                len(loaded.workers),
                self.bootstrap[1],
            )
        sub = await self.nc.subscribe(self._snapshot_subject, queue="snapshot", cb=self._on_snapshot)
        self._subs.append(sub)

    async def stop(self) -> None:
        """Say goodbye (peers take this frontend's requests out of their load at once)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for timer in (self._later, self._again):
            if timer is not None:
                timer.cancel()
        self.router.pull = None
        outbox = self.router.outbox
        if outbox is not None and (self._pulled is not None or self._dnc is not None):
            try:
                await self._send(msgpack.packb(outbox.batch(bye=True)))
                if self._pulled is not None:
                    await self._pulled.flush()
                else:
                    await self._dnc.flush(timeout=1)
            except Exception as exc:  # peers then notice the silence instead
                log.debug("goodbye to the peer frontends not sent: %s", exc)
        if self._pulled is not None:
            # What is unread is read first: a socket closed with bytes unread is reset, which
            # could overtake the goodbye on its way.
            with contextlib.suppress(ConnectionError):
                self._pulled.read()
            self._pulled.close()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection is gone already
                log.debug("unsubscribe failed: %s", exc)
        if self._dnc is not None:
            await natsrt.close(self._dnc)

    # ---- decisions ------------------------------------------------------------------
    def _wake_later(self, delay: float) -> None:
        if self._later is not None:
            self._later.cancel()
        self._later = asyncio.get_running_loop().call_later(delay, self._wake.set)

    async def _publish(self) -> None:
        outbox = self.router.outbox
        assert outbox is not None
        last = 0.0
        while True:
            await self._wake.wait()
            # One batch per event-loop turn while decisions are sparse; under a high request rate
            # at most one per `min_interval`: a message costs both ends far more than its records
            # (scripts/bench_decision_wire.py, 1,000 requests/s on 2 cores, sender + receiver CPU
            # per request: a batch per turn ~220 us, at most one per 2 ms ~120 us, per 5 ms ~115
            # us: most of it is socket writes and wake-ups), and 2 ms is short next to what a
            # prediction stands for (a prompt's prefill).
            wait = last + self.min_interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._wake.clear()
            batch = outbox.batch(heartbeat=self._beat_due)
            self._beat_due = False
            if batch is None:
                continue
            if self._later is not None:  # what it waited for goes now
                self._later.cancel()
                self._later = None
            last = time.monotonic()
            data = msgpack.packb(batch)
            limit = self._pulled.max_payload if self._pulled is not None else self._dnc.max_payload
            if len(data) > limit:  # many requests in flight announced at once
                parts = [msgpack.packb(b) for b in outbox.split(batch, limit, _packed_size)]
            else:
                parts = [data]
            for part in parts:
                try:
                    await self._send(part)
                except Exception as exc:  # disconnected: peers see a gap and are sent all again
                    log.debug("decision batch not sent: %s", exc)
                    break

    async def _send(self, data: bytes) -> None:
        """Publish one encoded batch (over the on-demand connection where there is one)."""
        if self._pulled is not None:
            self._pulled.publish(self._own, data)
        else:
            await self._dnc.publish(self._own, data)

    async def _beat(self) -> None:
        peers = self.router.peers
        assert peers is not None
        while True:
            await asyncio.sleep(self.heartbeat)
            self._beat_due = True
            self._wake.set()
            for replica in peers.expire(time.monotonic()):
                log.info("peer frontend %s went silent; its load is dropped", replica)

    async def _open_pull(self) -> Pulled | None:
        """The decisions' subscription on a connection read on demand; None where it cannot be
        had (TLS, or the server refused it: nats-py's subscription serves then)."""
        if natsrt.uses_tls(self.rt) or not self.rt.nats_url:
            return None
        try:
            return await self._connect_pull()
        except Unsupported:
            return None
        except ConnectionError as exc:
            log.warning("peer decisions over nats-py: the on-demand connection failed (%s)", exc)
            return None

    async def _connect_pull(self) -> Pulled:
        """Over the configured servers, then those of their cluster the last connection heard of."""
        assert self.rt.nats_url
        urls = natsrt.server_urls(self.rt.nats_url)
        if self._pulled is not None:
            urls += [f"nats://{u}" for u in self._pulled.cluster if f"nats://{u}" not in urls]
        return await Pulled.open(
            urls, self._decisions + ".*", name="dynvllm-frontend-peers", **natsrt.credentials(self.rt)
        )

    def pull(self) -> None:
        """Apply the peers' batches that have arrived (a routing decision is about to be made)."""
        pulled = self._pulled
        if pulled is None or pulled.closed:
            return
        try:
            batches = pulled.read()
        except ConnectionError as exc:  # `_pull_loop` connects again
            log.info("peer decisions: connection lost (%s); reconnecting", exc)
            return
        if batches:
            now = time.monotonic()
            for subject, data in batches:
                if subject != self._own:
                    self._apply(subject, data, now)

    async def _pull_loop(self) -> None:
        pinged = time.monotonic()
        while True:
            await asyncio.sleep(self.pull_interval)
            pulled = self._pulled
            assert pulled is not None
            if pulled.closed:
                await self._reconnect()
                continue
            self.pull()
            if not pulled.closed and time.monotonic() - pinged >= self.ping_interval:
                pinged = time.monotonic()
                try:  # a server gone without closing the connection answers no pings
                    pulled.ping()
                except ConnectionError as exc:
                    log.info("peer decisions: %s; reconnecting", exc)

    async def _reconnect(self) -> None:
        """The on-demand connection was lost (a NATS restart): what was published meanwhile is
        lost both ways. Peers' ends of requests are mended by their heartbeats' lists of open
        ones, their starts by the gap our next batch shows them (they send theirs again:
        `Peers.apply`). Ours are announced again now, as to a peer that just joined (peers skip
        those they know), and once more a heartbeat later for peers that reconnect after us."""
        try:
            self._pulled = await self._connect_pull()
        except (ConnectionError, Unsupported) as exc:
            log.debug("peer decisions: reconnecting failed (%s)", exc)
            await asyncio.sleep(0.25)
            return
        self._announce()
        if self._again is not None:
            self._again.cancel()
        self._again = asyncio.get_running_loop().call_later(self.heartbeat, self._announce)

    def _announce(self) -> None:
        outbox = self.router.outbox
        if outbox is not None and not outbox.alone:
            outbox.peers_changed(outbox.peers, joined=True)

    async def _on_decisions(self, msg: Any) -> None:
        if msg.subject != self._own:
            self._apply(msg.subject, msg.data, time.monotonic())

    def _apply(self, subject: str, data: bytes, now: float) -> None:
        peers = self.router.peers
        assert peers is not None
        try:
            peers.apply(msgpack.unpackb(data, raw=False), now)
        except Exception as exc:  # one bad batch must not stop the others
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("dropped a decision batch from %s (%d so far): %r", subject, self.dropped, exc)

    # ---- index snapshots ----------------------------------------------------------------
    async def _fetch(self) -> snap.Snapshot | None:
        """A live peer's index; None when no peer answers (the first frontend starts cold)."""
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        receiver = snap.Receiver()
        try:
            await self.nc.publish(self._snapshot_subject, b"", reply=inbox)
            while True:
                msg = await sub.next_msg(timeout=self.snapshot_timeout)
                if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
                    return None
                if receiver.feed(msg.data):
                    return receiver.snapshot()
        except Exception as exc:  # slow or broken peer: routing starts cold, as with none
            log.warning("no index from a peer frontend (%s: %s); starting cold", type(exc).__name__, exc)
            return None
        finally:
            await sub.unsubscribe()

    async def _on_snapshot(self, msg: Any) -> None:
        parts = self.router.policy.snapshot()
        if not msg.reply or parts is None:
            return
        unflushed = 0
        try:
            for data in snap.encode(parts, self.nc.max_payload):
                await self.nc.publish(msg.reply, data)
                unflushed += len(data)
                if unflushed >= _FLUSH_EVERY:
                    await self.nc.flush()
                    unflushed = 0
                # Requests and events go on between messages; each worker's part is consistent.
                await asyncio.sleep(0)
        except Exception as exc:  # the requester times out and starts cold
            log.warning("sending the router index to a new frontend failed: %s", exc)
