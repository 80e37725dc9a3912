"""How an encoder-only engine compiles, so that an image's embedding is computed as the language
worker would compute it itself.

vLLM picks kernels by compilation mode, in the vision tower too (which it runs uncompiled either
way): an eager engine takes its own custom ops (`vllm_c` RMSNorm, fused SiLU-and-mul), a compiling
one the torch-native ones, and some of those it compiles on their own (Qwen2.5-VL's vision MLP
activation: one rounding in Inductor's fused kernel where eager torch rounds twice in bf16). The
encode role used to run eager, as vLLM's disaggregated-encoder examples do, and handed a random
Qwen2.5-VL's language worker embeddings one bf16 step off its own (0 of 8 images bit-equal, on an
H200 and on this project's CPU hosts alike), so greedy text followed the path an image took. The
examples need eager only because capturing CUDA graphs looks for the language model's attention;
the encode engine instead compiles as the language workers do and captures no graphs.
"""

from __future__ import annotations

import copy
from typing import Any


def encoder_kernels(settings: Any) -> dict[str, Any]:
    """AsyncEngineArgs for the encode engine on top of its encoder-only ones: the language
    workers' compilation (and eagerness) without CUDA graphs. vLLM resolves from these what it
    resolves for them (eager, -O0 or a mode given), so the two engines pick the same kernels."""
    from vllm.config.compilation import CUDAGraphMode

    from dynvllm.worker.engine_args import parse_engine_args

    args = parse_engine_args(settings)  # the language workers' arguments: the same settings
    cc = copy.deepcopy(args.compilation_config)
    cc.cudagraph_mode = CUDAGraphMode.NONE
    return {"enforce_eager": bool(args.enforce_eager), "compilation_config": cc}
