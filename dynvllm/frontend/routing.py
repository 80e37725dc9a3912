"""The frontend's router: a policy (from `dynvllm.router.policies`) and the load it has sent out,
with its peers' when frontends share their decisions (`share`, see `dynvllm.router.replicas`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from dynvllm.router import image_keys
from dynvllm.router.index import KvIndex
from dynvllm.router.policies import Load, Pick, make_policy
from dynvllm.router.replicas import Outbox, Peers
from dynvllm.router.snapshot import Snapshot
from dynvllm.runtime.kv_topic import KvEventBatch
from dynvllm.settings import RouterSettings, Settings


class Router:
    def __init__(self, settings: Settings | RouterSettings | str) -> None:
        if isinstance(settings, str):
            settings = RouterSettings(router=settings)
        if isinstance(settings, RouterSettings):
            settings = Settings(router=settings)
        self.settings = settings.router
        self.policy_name = self.settings.router
        # The whole settings: a policy may read its own plugin group.
        self.policy = make_policy(settings)
        self.load = Load(decode_weight=self.settings.router_decode_weight)
        self.inflight = self.load.inflight
        #: This frontend's decisions for its peers, and theirs (None: not shared).
        self.outbox: Outbox | None = None
        self.peers: Peers | None = None
        #: KV event batches held back while the index loads from a peer (None: applied at once).
        self._buffered: list[KvEventBatch] | None = None
        #: Takes in the peers' decisions that have arrived, called before each choice (set when
        #: they are read on demand: `dynvllm.runtime.nats_pull`).
        self.pull: Callable[[], None] | None = None

    def share(
        self,
        replica: str,
        wake: Callable[[], None],
        silence: float,
        wake_later: Callable[[float], None] | None = None,
    ) -> None:
        """Publish decisions through an outbox (`wake` asks for a batch, `wake_later` for one
        after a delay: see `Outbox`) and take peers'."""
        # Alone until a peer's first batch arrives: no records published per request till then.
        self.outbox = Outbox(replica, wake, alone=True, wake_later=wake_later)
        self.peers = Peers(replica, self.load, self.policy, silence, self.outbox.peers_changed)

    @property
    def index(self) -> KvIndex | None:
        return self.policy.index

    @property
    def gaps(self) -> int:
        return getattr(self.policy, "gaps", 0)

    def choose(
        self,
        candidates: Sequence[str],
        tokens: Sequence[int] = (),
        block_size: int = 0,
        lora: str | None = None,
        images: Sequence[bytes] | None = None,
        image_rule: Mapping[str, Any] | None = None,
    ) -> Pick:
        """The worker (and rank, where the policy picks one) for a request. A prompt with images
        is keyed with them (`image_rule`: the workers' card's `image_placeholder`)."""
        if self.pull is not None:
            self.pull()
        choose_keys = getattr(self.policy, "choose_keys", None)
        if images and block_size > 0 and choose_keys is not None:
            keys = image_keys.place(tokens, images, image_rule, block_size).keys(block_size, lora)
            pick: Pick = choose_keys(candidates, keys, self.load)
            return pick
        return self.policy.choose(candidates, tokens, block_size, lora, self.load)

    def set_ranks(self, worker_id: str, first: int, count: int) -> None:
        """A data-parallel instance: its ranks are routing targets of their own."""
        if count > 1:
            self.load.ranks[worker_id] = (first, count)
        else:
            self.load.ranks.pop(worker_id, None)

    def started(
        self, worker_id: str | None, blocks: float = 1.0, rank: int | None = None, keys: Sequence[int] = ()
    ) -> int:
        """A request went to the worker: `blocks` of prompt, `keys` those of them the policy keyed.
        Returns the request's ticket for `grow` and `finished` (0: not shared)."""
        if worker_id:
            self.inflight[worker_id] += 1
            self.load.add(worker_id, rank or 0, blocks, keys)
            if self.outbox is not None:
                return self.outbox.started(worker_id, rank or 0, blocks, keys)
        return 0

    def grow(self, worker_id: str | None, rank: int | None, blocks: int, ticket: int = 0) -> None:
        """A request in flight there filled `blocks` more KV blocks with its output (shared: they
        count when its peers are told, see `Outbox.grew`)."""
        if worker_id and self.inflight.get(worker_id, 0) > 0:
            if ticket and self.outbox is not None:
                self.outbox.grew(ticket, blocks, functools.partial(self._grown, worker_id, rank or 0, blocks))
            else:
                self.load.count(worker_id, rank or 0, blocks)

    def _grown(self, worker_id: str, rank: int, blocks: int) -> None:
        if self.inflight.get(worker_id, 0) > 0:  # (not forgotten meanwhile)
            self.load.count(worker_id, rank, blocks)

    def finished(
        self,
        worker_id: str | None,
        blocks: float = 1.0,
        rank: int | None = None,
        keys: Sequence[int] = (),
        grown: int = 0,
        ticket: int = 0,
    ) -> None:
        """The request ended; `grown`: the blocks its output added (see `grow`); `ticket`: what
        `started` returned. Shared, it leaves this frontend's Load when its peers are told (see
        `Outbox.finished`), so that they all count the same requests."""
        if worker_id and self.outbox is not None:
            release = functools.partial(self._release, worker_id, blocks, rank, keys, grown)
            self.outbox.finished(ticket or self.outbox.match(worker_id, rank or 0, keys), release)
        else:
            self._release(worker_id, blocks, rank, keys, grown)

    def _release(
        self, worker_id: str | None, blocks: float, rank: int | None, keys: Sequence[int], grown: int
    ) -> None:
        if worker_id and self.inflight.get(worker_id, 0) > 0:
            self.inflight[worker_id] -= 1
            self.load.remove(worker_id, rank or 0, blocks, keys)
            if grown:
                self.load.count(worker_id, rank or 0, -grown)

    def forget(self, worker_id: str) -> None:
        self.load.forget(worker_id)
        self.policy.forget(worker_id)
        if self.peers is not None:
            self.peers.forget_worker(worker_id)

    def on_kv_events(self, batch: KvEventBatch) -> None:
        if self._buffered is not None:
            self._buffered.append(batch)
            return
        self.policy.on_kv_events(batch)

    def begin_bootstrap(self) -> None:
        """Hold KV events back until `end_bootstrap` (a peer's snapshot is on its way)."""
        self._buffered = []

    def end_bootstrap(self, snapshot: Snapshot | None) -> None:
        """Load the peer's snapshot (None: start cold), then the events held back meanwhile."""
        for _ in self.end_bootstrap_steps(snapshot):
            pass

    def end_bootstrap_steps(self, snapshot: Snapshot | None) -> Iterator[None]:
        """`end_bootstrap` in steps (a worker each), for a caller that yields to its event loop
        between them; events arriving meanwhile are still held back until the last step."""
        buffered = self._buffered if self._buffered is not None else []
        for _ in self.policy.restore(snapshot, buffered):
            yield
        self._buffered = None


def request_blocks(prompt_len: int, block_size: int) -> float:
    return float(math.ceil(prompt_len / block_size)) if block_size > 0 else 1.0
