"""The KV-event topic: engine events relayed by workers to routers, with a relay sequence."""

from __future__ import annotations

from dataclasses import dataclass, field

from dynvllm.runtime.events import EventTopic


@dataclass
class KvEventBatch:
    instance_id: str
    dp_rank: int = 0
    seq: int = 0
    events: list = field(default_factory=list)


KV_EVENTS = EventTopic("kv", KvEventBatch)
