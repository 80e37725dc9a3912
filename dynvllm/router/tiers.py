"""Where a cached block lives: the engine's GPU memory, or a tier it offloads to (pure).

vLLM's KV events name the medium (`BlockStored.medium`, `BlockRemoved.medium`): "GPU" for its
own prefix cache, "CPU" and "STORAGE" for blocks an offloading connector (vLLM's native
`OffloadingConnector`, LMCache) keeps. A block in a lower tier is still worth routing to: loading
it back costs a copy, not a prefill. Router events carry the tier as a small int, and leave it out
for the GPU (the common case stays one field shorter on the wire).
"""

from __future__ import annotations

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
