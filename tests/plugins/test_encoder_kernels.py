"""The encode engine compiles as the language workers do (without CUDA graphs), so every kernel
vLLM picks by compilation mode is the same on both sides: an eager encoder behind compiling
language workers handed a random Qwen2.5-VL embeddings one bf16 step off (0 of 8 images
bit-equal, GPU and CPU alike) and greedy text followed the path an image took."""

from __future__ import annotations

import pytest

from dynvllm import settings as S
from dynvllm_plugins.roles.encode import ENCODER_ONLY
from dynvllm_plugins.roles.encoder_kernels import encoder_kernels


@pytest.fixture(scope="module")
def vision_model(tmp_path_factory):
    from dynvllm.models.tiny_vision import build_tiny_vision_model

    return build_tiny_vision_model(tmp_path_factory.mktemp("vision") / "model")


def _configs(model, *argv: str):
    """vLLM's resolved configuration of a language worker and of the encode engine beside it."""
    from dynvllm.worker.engine_args import parse_engine_args

    settings = S.build_settings({"engine": {"model": str(model)}}, extra_engine_args=list(argv))
    language = parse_engine_args(settings)
    encode = parse_engine_args(settings, {**ENCODER_ONLY, **encoder_kernels(settings)})
    return language.create_engine_config(), encode.create_engine_config()


def _kernels(config) -> tuple:
    cc = config.compilation_config
    return cc.mode, cc.backend, cc.custom_ops, cc.ir_enable_torch_wrap, config.kernel_config.ir_op_priority


@pytest.mark.parametrize(
    "argv",
    [
        (),  # vLLM's default: compiled
        ("--enforce-eager",),  # eager language workers: the encode engine eager too
        ("-O0",),  # not compiled
        ("-cc", '{"mode": 0}'),
        ("-O0", "-cc", '{"mode": 3}'),  # a mode given wins over -O0
        ("-cc", '{"custom_ops": ["all"]}'),  # the operator's choice reaches both
    ],
)
def test_the_encode_engine_resolves_the_language_workers_kernels(vision_model, argv):
    from vllm.config.compilation import CUDAGraphMode

    language, encode = _configs(vision_model, *argv)
    assert encode.model_config.multimodal_config.mm_encoder_only
    assert not encode.cache_config.enable_prefix_caching
    assert encode.compilation_config.cudagraph_mode == CUDAGraphMode.NONE  # nothing to capture
    assert _kernels(encode) == _kernels(language)
    assert encode.model_config.enforce_eager is language.model_config.enforce_eager
    if argv and argv[0] == "-cc":
        assert encode.compilation_config.custom_ops == ["all"]
