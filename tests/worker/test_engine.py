"""The engine layer's pure parts: vLLM logprobs and sampling options in wire form, images for
vLLM's processor, the ranks a data-parallel engine runs, and what the base engine refuses."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest

from dynvllm.runtime.errors import BadRequest
from dynvllm.settings import build_settings
from dynvllm.worker.engine import Engine
from dynvllm.worker.vllm_engine import VllmEngine, _decode_images, _logprobs, _vllm_sampling


def _lp(logprob: float, rank: int | None) -> SimpleNamespace:
    return SimpleNamespace(logprob=logprob, rank=rank)


def test_logprobs_take_the_chosen_token_and_the_top_k_by_rank():
    entries = [
        None,  # the first prompt token has none
        {3: _lp(-1.0, 2), 7: _lp(-0.5, 1), 4: _lp(-2.0, 3)},
        {9: _lp(-3.0, 4), 1: _lp(-0.1, 1)},  # the chosen token ranks below k
        {2: _lp(-0.2, 1), 8: _lp(-0.7, None)},  # a chosen token vLLM gave no rank
    ]
    assert _logprobs([5, 7, 9, 8], entries, 2) == [
        None,
        [-0.5, [[7, -0.5], [3, -1.0]]],
        [-3.0, [[1, -0.1]]],
        [-0.7, [[2, -0.2]]],
    ]


def test_a_token_missing_from_its_entry_is_minus_infinity_and_no_entries_is_no_logprobs():
    [(chosen, top)] = _logprobs([8], [{1: _lp(-0.1, 1)}], 1)
    assert math.isinf(chosen) and chosen < 0 and top == [[1, -0.1]]
    assert _logprobs([1, 2], None, 1) == []


def test_sampling_options_take_vllms_types():
    from vllm.sampling_params import StructuredOutputsParams

    got = _vllm_sampling(
        {"temperature": 0.5, "structured_outputs": {"regex": "a+"}, "logit_bias": [[5, 1], ["7", -100]]}
    )
    assert got["temperature"] == 0.5
    assert isinstance(got["structured_outputs"], StructuredOutputsParams)
    assert got["structured_outputs"].regex == "a+"
    assert got["logit_bias"] == {5: 1.0, 7: -100.0}
    assert _vllm_sampling({"structured_outputs": None, "logit_bias": None}) == {"logit_bias": None}


def _png(color: tuple[int, int, int], mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (4, 3), color if mode == "RGB" else color[0]).save(buf, format="PNG")
    return buf.getvalue()


def test_images_are_decoded_to_rgb_and_one_image_is_passed_alone():
    one = _decode_images([_png((255, 0, 0), mode="L")])
    assert one.mode == "RGB" and one.size == (4, 3)
    two = _decode_images([_png((255, 0, 0)), _png((0, 0, 255))])
    assert [im.getpixel((0, 0)) for im in two] == [(255, 0, 0), (0, 0, 255)]
    with pytest.raises(BadRequest, match="an image cannot be decoded"):
        _decode_images([_png((1, 2, 3)), b"\x89PNG not really"])


def test_a_data_parallel_engine_runs_its_local_ranks(tiny_model):
    def ranks(*argv: str) -> range:
        return VllmEngine().local_ranks(build_settings({"engine": {"model": str(tiny_model)}}, list(argv)))

    assert ranks() == range(1)
    assert ranks("--data-parallel-size", "4") == range(4)
    assert ranks("--data-parallel-size", "4", "--data-parallel-size-local", "2") == range(2)
    headless = ["--data-parallel-size-local", "2", "--data-parallel-start-rank", "2"]
    assert ranks("--data-parallel-size", "4", *headless) == range(2, 4)


def test_the_leader_card_names_its_ranks_and_where_headless_ones_connect():
    single = SimpleNamespace(data_parallel_size=1)
    assert VllmEngine._ranks_card(single) == {}
    pc = SimpleNamespace(
        data_parallel_size=4, data_parallel_master_ip="10.0.0.1", data_parallel_rpc_port=1234
    )
    assert VllmEngine._ranks_card(pc) == {
        "dp_size": 4,
        "dp_start_rank": 0,
        "dp_address": "10.0.0.1",
        "dp_rpc_port": 1234,
    }


async def test_the_base_engine_refuses_operations_by_its_kind():
    class Plain(Engine):
        kind = "plain"

    e = Plain()
    for op in (e.clear_kv(), e.sleep(1), e.wake()):
        with pytest.raises(BadRequest, match="the plain engine cannot"):
            await op
    with pytest.raises(BadRequest, match="'embed'"):
        await e.pool({}, "embed")
    assert e.adapter_capacity() == 0 and e.errored is False
    assert e.local_ranks(build_settings({})) == range(1)
