"""Which kernels an encoder-only engine runs its vision tower with, so that an image's embedding
is computed as the language worker would compute it itself.

The encode engine runs eager (no language model to compile or capture). vLLM picks the kernels of
its custom ops by compilation mode: an eager engine takes its own (`custom_ops` "all": on CUDA
FlashAttention for the vision tower's attention, `vllm_c` RMSNorm), an engine that compiles with
Inductor the torch-native ones ("none": SDPA, native RMSNorm), in the vision tower too, which it
runs uncompiled. They round differently, and a model whose greedy choice is a near-tie follows
the embedding it is given: a random Qwen2.5-VL on an H200 gave other greedy text for 5 of 8
images through an eager encode worker than through agg. So the encode engine takes the ops the
language workers' configuration implies; what the operator set explicitly is kept.
"""

from __future__ import annotations

import copy
from typing import Any

#: IR ops whose default implementation vLLM chooses by compilation mode.
NORM_OPS = ("rms_norm", "fused_add_rms_norm")


def compiles_with_inductor(
    enforce_eager: bool, mode: int | None, backend: str, optimization_level: int
) -> bool:
    """Whether an engine of these arguments compiles with Inductor (vLLM's own rule: no mode
    given means compile unless eager or -O0)."""
    if enforce_eager or mode == 0:
        return False
    if mode is None and optimization_level == 0:
        return False
    return backend in ("inductor", "")


def native_ops(
    custom_ops: list[str], norm_priority: dict[str, list[str]]
) -> tuple[list[str], dict[str, list[str]]]:
    """The custom-op list and norm priorities of an engine that compiles with Inductor, where the
    operator left vLLM to choose."""
    ops = list(custom_ops)
    if "all" not in ops and "none" not in ops:
        ops.append("none")
    return ops, {name: (prio or ["native"]) for name, prio in norm_priority.items()}


def encoder_kernels(settings: Any) -> dict[str, Any]:
    """AsyncEngineArgs for the encode engine: the language workers' choice of kernels (nothing
    when they run eager too, which is the encode engine's own choice)."""
    from dynvllm.worker.engine_args import parse_engine_args

    args = parse_engine_args(settings)  # the language workers' arguments: the same settings
    cc = args.compilation_config
    level = int(getattr(args, "optimization_level", 2))
    if not compiles_with_inductor(bool(args.enforce_eager), cc.mode, str(cc.backend), level):
        return {}
    cc = copy.deepcopy(cc)
    kernels = copy.deepcopy(getattr(args, "kernel_config", None))
    priority = getattr(kernels, "ir_op_priority", None)
    norms = {name: list(getattr(priority, name)) for name in NORM_OPS if hasattr(priority, name)}
    cc.custom_ops, norms = native_ops(cc.custom_ops, norms)
    out: dict[str, Any] = {"compilation_config": cc}
    if norms:
        for name, prio in norms.items():
            setattr(priority, name, prio)
        out["kernel_config"] = kernels
    return out
