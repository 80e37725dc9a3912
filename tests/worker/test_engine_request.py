"""The engine gets the request vLLM's server would give it: the SamplingParams the worker builds
from the frontend's wire request equal those vLLM's own chat endpoint builds from the same body,
field by field (pure: no engine runs)."""

from __future__ import annotations

import msgpack
import pytest

from dynvllm import protocol
from dynvllm.frontend.openai import schema as oa
from dynvllm.worker.vllm_engine import sampling_params

MESSAGES = [{"role": "user", "content": "hi"}]
# scripts/gpu/loadgen.py's body (the GPU comparisons' load), then one setting every option the
# engine core reads per step: sampler paths, penalties, seeds, logprobs, stop ids, min_tokens.
LOADGEN = {"stream": True, "max_tokens": 200, "stream_options": {"include_usage": True}, "ignore_eos": True}
EVERY = {
    "stream": True,
    "max_tokens": 50,
    "n": 2,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 20,
    "min_p": 0.05,
    "seed": 7,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.3,
    "repetition_penalty": 1.1,
    "min_tokens": 3,
    "stop_token_ids": [5, 9],
    "logprobs": True,
    "top_logprobs": 2,
    "logit_bias": {"5": 1.5},
    "allowed_token_ids": [5, 6, 7, 9],
}
# The frontend detokenizes and applies stop strings itself; vLLM's server has the engine do it.
FRONTEND_ONLY = {"detokenize"}


def _fields(params) -> dict:
    out = {f: getattr(params, f) for f in params.__struct_fields__ if f not in FRONTEND_ONLY}
    if out.get("logit_bias"):
        out["logit_bias"] = {int(k): float(v) for k, v in out["logit_bias"].items()}
    return out


@pytest.mark.parametrize("body", [LOADGEN, EVERY], ids=["loadgen", "every_option"])
def test_the_worker_builds_the_sampling_params_vllms_server_builds(body):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    body = {"model": "m", "messages": MESSAGES, **body}
    theirs = ChatCompletionRequest(**body).to_sampling_params(body["max_tokens"], {})
    wire = oa.validate(oa.ChatRequest, body).sampling(body["max_tokens"], 512, {})
    # As the worker receives it: through msgpack, as the frontend sends it.
    payload = msgpack.unpackb(msgpack.packb(protocol.generate_request("r", [1, 2, 3], wire)))
    ours = sampling_params(protocol.parse_generate(payload))
    assert _fields(ours) == _fields(theirs)
    assert ours.detokenize is False and theirs.detokenize is True
    # Fresh per request: vLLM takes it without a deep copy, as it does its server's.
    assert ours.skip_clone is True
