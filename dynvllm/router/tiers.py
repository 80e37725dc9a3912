"""Where a cached block lives: the engine's GPU memory, or a tier it offloads to (pure).

vLLM's KV events name the medium (`BlockStored.medium`, `BlockRemoved.medium`): "GPU" for its
own prefix cache, "CPU" and "STORAGE" for blocks an offloading connector (vLLM's native
`OffloadingConnector`, LMCache) keeps. A block in a lower tier is still worth routing to: loading
it back costs a copy, not a prefill. Router events carry the tier as a small int, and leave it out
for the GPU (the common case stays one field shorter on the wire). `TierBlocks` is what the
router's index (`index`) keeps per offload tier.
"""

from __future__ import annotations

from collections.abc import Iterable

from dynvllm.router.masks import count_held, set_bit

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
    """An offload tier's blocks: holder masks (worker ids of the GPU index), and per worker a set
    of its keys (stores here are a fraction of the GPU's, and the sets answer the walks below)."""

    def __init__(self, gpu: dict[int, int]) -> None:
        self.gpu = gpu  # the GPU index's holder masks
        self.holders: dict[int, int] = {}
        self.keys_of: dict[int, set[int]] = {}
        #: Per worker, how many blocks it holds here and not on its GPU, and the mask of workers
        #: with any. Only they can go on below where their GPU prefix ends, so while lower tiers
        #: hold copies of GPU blocks only, a lookup costs what a GPU-only one does.
        self.deep: dict[int, int] = {}
        self.deep_mask = 0

    def deeper(self, wid: int, n: int) -> None:
        left = self.deep.get(wid, 0) + n
        if left > 0:
            self.deep[wid] = left
            self.deep_mask |= 1 << wid
        else:
            self.deep.pop(wid, None)
            self.deep_mask &= ~(1 << wid)

    def store(self, wid: int, keys: list[int], on_gpu: Iterable[int] = ()) -> None:
        """`on_gpu`: keys known to be on the worker's GPU (spares probing the GPU's masks)."""
        mine = self.keys_of.get(wid)
        if mine is None:
            mine = self.keys_of[wid] = set()
        fresh = set(keys).difference(mine) if mine else set(keys)
        if not fresh:
            return
        bit = 1 << wid
        # New here and not on the GPU: held only here (offloads of GPU blocks: none).
        unsure = fresh.difference(on_gpu) if on_gpu else fresh
        only_here = len(unsure) - count_held(self.gpu, bit, wid, unsure) if unsure else 0
        if only_here:
            self.deeper(wid, only_here)
        mine.update(fresh)
        set_bit(self.holders, bit, fresh)

    def remove(self, wid: int, keys: Iterable[int]) -> None:
        mine = self.keys_of.get(wid)
        if not mine:
            return
        holders, gpu, bit = self.holders, self.gpu, 1 << wid
        for key in keys:
            if key not in mine:
                continue
            mine.discard(key)
            have = holders[key]
            if have == bit:
                del holders[key]
            else:
                holders[key] = have ^ bit
            if not gpu.get(key, 0) & bit:  # a block held only here went
                self.deeper(wid, -1)

    def forget(self, wid: int) -> None:
        holders, bit = self.holders, 1 << wid
        for key in self.keys_of.pop(wid, ()):
            have = holders[key]
            if have == bit:
                del holders[key]
            else:
                holders[key] = have ^ bit
        self.deeper(wid, -self.deep.get(wid, 0))
