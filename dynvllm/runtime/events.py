"""Typed publish/subscribe per namespace, for load metrics and KV events."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgpack

from dynvllm.runtime.names import validate_token

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger("dynvllm.events")
T = TypeVar("T", bound="DataclassInstance")


@dataclasses.dataclass
class LoadMetrics:
    instance_id: str
    running: int = 0
    waiting: int = 0
    kv_used_blocks: int = 0
    kv_total_blocks: int = 0
    timestamp: float = 0.0


class EventTopic(Generic[T]):
    """A named event kind carrying one dataclass type."""

    def __init__(self, kind: str, cls: type[T]) -> None:
        self.kind = validate_token(kind, "event kind")
        self.cls = cls

    def subject(self, namespace: str) -> str:
        return f"{namespace}.events.{self.kind}"

    def encode(self, event: T) -> bytes:
        return msgpack.packb(dataclasses.asdict(event))

    def decode(self, data: bytes) -> T:
        obj = msgpack.unpackb(data, raw=False)
        return self.cls(**obj)


LOAD = EventTopic("load", LoadMetrics)


class EventBus:
    def __init__(self, nc: Any, namespace: str) -> None:
        self.nc, self.namespace = nc, namespace
        #: Malformed events dropped, by subject.
        self.dropped: Counter[str] = Counter()

    async def publish(self, topic: EventTopic[T], event: T) -> None:
        await self.nc.publish(topic.subject(self.namespace), topic.encode(event))

    async def subscribe(self, topic: EventTopic[T], cb: Callable[[T], Awaitable[None] | None]) -> Any:
        async def on_msg(msg: Any) -> None:
            # An event that does not decode, or that its subscriber refuses (e.g. a key the
            # router's table cannot hold), is dropped: never fatal to the subscriber.
            try:
                res = cb(topic.decode(msg.data))
                if res is not None:
                    await res
            except Exception as exc:
                self._dropped(msg.subject, exc)

        return await self.nc.subscribe(topic.subject(self.namespace), cb=on_msg)

    def _dropped(self, subject: str, exc: Exception) -> None:
        self.dropped[subject] += 1
        n = self.dropped[subject]
        # The first and then every 1000th, so a misbehaving publisher cannot flood the log.
        if n == 1 or n % 1000 == 0:
            log.warning(
                "dropped a malformed event on %s (%d so far): %s: %s", subject, n, type(exc).__name__, exc
            )
