"""The wire generate request: engines check it with one public helper."""

from __future__ import annotations

import pytest

from dynvllm import protocol
from dynvllm.runtime.errors import BadRequest


def test_a_request_round_trips_with_its_handoff():
    wire = protocol.generate_request("r1", [1, 2], {"max_tokens": 3}, kv_transfer_params={"x": 1})
    req = protocol.parse_generate(wire)
    assert (req.request_id, req.token_ids, req.sampling, req.kv_transfer_params) == (
        "r1",
        [1, 2],
        {"max_tokens": 3},
        {"x": 1},
    )


@pytest.mark.parametrize(
    "payload,needle",
    [
        ([1, 2], "a map"),
        ({"request_id": "", "token_ids": [1]}, "request_id"),
        ({"request_id": "r", "token_ids": []}, "token_ids"),
        ({"request_id": "r", "token_ids": [1, -2]}, "token_ids"),
        ({"request_id": "r", "token_ids": [1], "sampling": [1]}, "sampling"),
        ({"request_id": "r", "token_ids": [1], "lora_name": "x"}, "does not implement: ['lora_name']"),
        ({"request_id": "r", "token_ids": [1], "lora": 3}, "adapter name"),
        ({"request_id": "r", "token_ids": [1], "kv_transfer_params": 3}, "kv_transfer_params"),
    ],
)
def test_bad_requests_name_what_is_wrong(payload, needle):
    with pytest.raises(BadRequest, match=needle.replace("[", r"\[").replace("]", r"\]")):
        protocol.parse_generate(payload)


def test_unknown_sampling_options_are_a_caller_bug():
    with pytest.raises(ValueError, match="unsupported sampling options"):
        protocol.sampling_kwargs({"best_of": 3})
