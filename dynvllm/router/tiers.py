"""Where a cached block lives: the engine's GPU memory, or a tier it offloads to (pure).

vLLM's KV events name the medium (`BlockStored.medium`, `BlockRemoved.medium`): "GPU" for its
own prefix cache, "CPU" and "STORAGE" for blocks an offloading connector (vLLM's native
`OffloadingConnector`, LMCache) keeps. A block in a lower tier is still worth routing to: loading
it back costs a copy, not a prefill. Router events carry the tier as a small int, and leave it out
for the GPU (the common case stays one field shorter on the wire). `TierBlocks` is what the
router's index (`index`) keeps per offload tier.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import filterfalse

from dynvllm.router.key_log import KeyLog
from dynvllm.router.masks import PyHolders, Table

GPU, CPU, DISK = 0, 1, 2
NAMES = {GPU: "GPU", CPU: "CPU", DISK: "DISK"}

# Defaults for what loading one block from a tier costs, as a share of prefilling it. Reasoning
# (an 8B model in bf16 on an H100/H200 class GPU, 32-token blocks): a block's KV is ~4 MiB
# (128 KiB per token); prefill runs at ~15k tokens/s, ~2.1 ms a block; pinned host memory moves
# it over PCIe 5 at ~25 GB/s effective, ~0.17 ms (0.08 of the prefill), an NVMe read at ~5 GB/s
# ~0.8 ms (0.4). Rounded up for the scheduling and lookup the load adds: 0.1 and 0.4.
DEFAULT_CPU_COST = 0.1
DEFAULT_DISK_COST = 0.4


def tier_of(medium: object) -> int:
    """The tier an event's medium names; None (older engines) is the GPU. A medium this router
    does not know counts as the slowest tier: credited a little, never as a GPU hit."""
    if medium is None:
        return GPU
    name = str(medium).upper()
    if name == "GPU":
        return GPU
    if name in ("CPU", "CPU_PINNED", "HOST"):
        return CPU
    return DISK


class TierBlocks:
    """An offload tier's blocks: holder masks (worker ids of the GPU index), per worker the event
    lists it stored here (`KeyLog`: for forgetting and snapshots only), and per worker the keys it
    holds here and not on its GPU (`deep`). Only those workers can go on below where their GPU
    prefix ends, so while lower tiers hold copies of GPU blocks only, a lookup costs what a
    GPU-only one does; and the sets stay as small as what the GPU dropped."""

    def __init__(self, gpu: Table, table: Callable[[], Table] = PyHolders) -> None:
        self.gpu = gpu  # the GPU index's holder masks
        self.holders = table()
        self.logs: dict[int, KeyLog] = {}
        #: Per worker: its keys held here and not on its GPU (never empty), and the mask of them.
        self.deep: dict[int, set[int]] = {}
        self.deep_mask = 0

    def _deeper(self, wid: int, keys: Iterable[int]) -> None:
        mine = self.deep.get(wid)
        if mine is None:
            mine = set(keys)
            if mine:
                self.deep[wid] = mine
                self.deep_mask |= 1 << wid
        else:
            mine.update(keys)

    def back_on_gpu(self, wid: int, keys: list[int]) -> None:
        """`keys` are on the worker's GPU now: none of them is held here only."""
        mine = self.deep.get(wid)
        if mine is not None:
            mine.difference_update(keys)
            if not mine:
                self._shallow(wid)

    def off_gpu(self, wid: int, keys: list[int]) -> None:
        """`keys` left the worker's GPU: those it holds here are now held here only."""
        if wid in self.logs:
            self._deeper(wid, self.holders.with_bit(wid, keys))

    def all_off_gpu(self, wid: int) -> None:
        """The worker's GPU cache was cleared: all it holds here is held here only."""
        log = self.logs.get(wid)
        if log is not None:
            self._deeper(wid, log.held())

    def _shallow(self, wid: int) -> None:
        del self.deep[wid]
        self.deep_mask &= ~(1 << wid)

    def store(self, wid: int, keys: list[int], on_gpu: list[int] | tuple[()] = ()) -> None:
        """`on_gpu`: keys known to be on the worker's GPU (spares probing the GPU's masks)."""
        # Keys the worker held here already are set, logged and counted again: the masks, the
        # log (deduped when compacted) and the sets take each once.
        self.holders.set_bit(wid, keys)
        log = self.logs.get(wid)
        if log is None:
            log = self.logs[wid] = KeyLog()
        log.add(keys)
        # Not on the GPU: held only here (offloads of the GPU's last store: none).
        if on_gpu and keys != on_gpu:
            last = set(on_gpu)
            unsure: list[int] = list(filterfalse(last.__contains__, keys))
        else:
            unsure = [] if on_gpu else keys
        if unsure:
            self._deeper(wid, self.gpu.without_bit(wid, unsure))

    def remove(self, wid: int, keys: Iterable[int]) -> None:
        log = self.logs.get(wid)
        if log is None:
            return
        gone = self.holders.clear_bit(wid, keys)
        if gone:
            log.drop(gone)
            self.back_on_gpu(wid, gone)  # (gone from here: not held here only either)

    def forget(self, wid: int) -> None:
        log = self.logs.pop(wid, None)
        if log is not None:
            for keys in log.lists:
                self.holders.clear_bit(wid, keys)
        if wid in self.deep:
            self._shallow(wid)

    def held(self, wid: int) -> list[int]:
        log = self.logs.get(wid)
        return log.held() if log is not None else []
