"""The encode engine runs eager but takes the kernels of the language workers' configuration: an
image's embedding must be computed with the ops the language worker would use itself (an eager
encoder behind compiling language workers gave other greedy text for half of a random
Qwen2.5-VL's images)."""

from __future__ import annotations

import pytest

from dynvllm import settings as S
from dynvllm_plugins.roles.encode import ENCODER_ONLY
from dynvllm_plugins.roles.encoder_kernels import compiles_with_inductor, encoder_kernels, native_ops


@pytest.mark.parametrize(
    ("eager", "mode", "backend", "level", "compiles"),
    [
        (False, None, "inductor", 2, True),  # vLLM's default
        (True, None, "inductor", 2, False),  # --enforce-eager
        (False, 0, "inductor", 2, False),  # -cc.mode=0
        (False, None, "inductor", 0, False),  # -O0
        (False, 3, "eager", 2, False),  # compiled without Inductor: vLLM keeps its own kernels
        (False, 3, "", 2, True),
    ],
)
def test_which_configurations_compile_with_inductor(eager, mode, backend, level, compiles):
    assert compiles_with_inductor(eager, mode, backend, level) is compiles


def test_native_ops_leave_what_the_operator_chose():
    norms = {"rms_norm": [], "fused_add_rms_norm": []}
    assert native_ops([], norms) == (["none"], {"rms_norm": ["native"], "fused_add_rms_norm": ["native"]})
    assert native_ops(["+silu_and_mul"], {"rms_norm": ["vllm_c"]}) == (
        ["+silu_and_mul", "none"],
        {"rms_norm": ["vllm_c"]},
    )
    assert native_ops(["all"], {})[0] == ["all"]


def _engine_args(folder, *argv: str, **engine):
    from dynvllm.worker.engine_args import parse_engine_args

    settings = S.build_settings({"engine": {"model": str(folder), **engine}}, extra_engine_args=list(argv))
    return parse_engine_args(settings, {**ENCODER_ONLY, **encoder_kernels(settings)})


def test_the_encode_engine_takes_the_language_workers_kernels(tmp_path):
    compiled = _engine_args(tmp_path)
    assert compiled.enforce_eager and compiled.mm_encoder_only  # still an eager encoder-only engine
    assert compiled.compilation_config.custom_ops == ["none"]
    assert compiled.kernel_config.ir_op_priority.rms_norm == ["native"]
    eager = _engine_args(tmp_path, enforce_eager=True)  # eager language workers: vLLM's eager choice on both
    assert eager.compilation_config.custom_ops == [] and eager.kernel_config.ir_op_priority.rms_norm == []
    chosen = _engine_args(tmp_path, "-cc", '{"custom_ops": ["all"]}')  # the operator's choice reaches both
    assert chosen.compilation_config.custom_ops == ["all"]
