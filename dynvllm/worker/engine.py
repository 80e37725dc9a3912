"""What an engine plugin provides (entry-point group `dynvllm.engines`, loaded by workers).

An engine turns wire generate requests into wire deltas and reports what a model card needs.
`vllm` is the real engine; `sim` is a simulated one for routing experiments at scale. In-flight
accounting, cancellation and error reporting are the worker's, around every call; an engine
only has to abort its own request when its generator is closed early.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from dynvllm.runtime.errors import BadRequest
from dynvllm.settings import Settings
from dynvllm.worker.stats import SchedulerSnapshot


class Engine:
    #: Shown in cards and `dynvllm status`, so a simulated engine is never mistaken for a real one.
    kind = "engine"

    def check_args(self, settings: Settings) -> None:
        """Raise ValueError with a clear message if the settings cannot start this engine."""

    def start(
        self,
        settings: Settings,
        overrides: dict[str, Any],
        snapshot: SchedulerSnapshot,
        kv_endpoint: str | None,
        kv_replay: str | None,
    ) -> None:
        """Start; publish KV events to `kv_endpoint` (a ZMQ SUB the worker binds) if given."""
        raise NotImplementedError

    def local_ranks(self, settings: Settings) -> range:
        """The data-parallel ranks this process's engine runs (each publishes its own KV events
        on the KV endpoint's port + rank)."""
        return range(1)

    def card(self) -> dict[str, Any]:
        """path, tokenizer, context_length, block_size, kv_blocks (and dp_size, dp_start_rank
        for a data-parallel engine)."""
        raise NotImplementedError

    def generate(self, payload: Any) -> AsyncIterator[dict]:
        """Stream wire deltas (see `dynvllm.protocol.delta`) for one request; check the payload
        with `dynvllm.protocol.parse_generate`."""
        raise NotImplementedError

    async def pool(self, payload: Any, task: str) -> dict[str, Any]:
        """Run one pooling call (`dynvllm.protocol.parse_pool`) for `task`: {"data": the pooled
        output (a list of floats for embed), "prompt_tokens": n, "cached_tokens": n}."""
        raise BadRequest(f"the {self.kind} engine cannot run {task!r} (pooling) requests")

    async def canary(self) -> None:
        """Generate one token; raise if the engine cannot serve."""
        raise NotImplementedError

    def adapter_capacity(self) -> int:
        """How many LoRA adapters the engine can hold at once (0: none)."""
        return 0

    async def load_adapter(self, name: str, path: str) -> None:
        raise NotImplementedError

    async def unload_adapter(self, name: str) -> None:
        """Remove an adapter once the requests using it have finished; new ones are refused."""
        raise NotImplementedError

    async def clear_kv(self) -> None:
        """Drop every cached prefix block (routers are told through the engine's KV events)."""
        raise BadRequest(f"the {self.kind} engine cannot clear its KV cache")

    async def sleep(self, level: int) -> None:
        raise BadRequest(f"the {self.kind} engine cannot sleep")

    async def wake(self) -> None:
        raise BadRequest(f"the {self.kind} engine cannot sleep")

    @property
    def errored(self) -> bool:
        return False

    def shutdown(self) -> None:
        pass
