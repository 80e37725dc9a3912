"""A model's generation config fills what a request leaves out, as vLLM's server does (pure)."""

from __future__ import annotations

import pytest

from dynvllm.frontend.models import ModelEntry
from dynvllm.frontend.openai import schema as oa
from dynvllm.frontend.request_path import RequestPath

QWEN3 = {"temperature": 0.6, "top_k": 20, "top_p": 0.95}


def _chat(**fields):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return oa.validate(oa.ChatRequest, body)


def test_unset_fields_take_the_models_defaults_and_set_ones_win():
    s = _chat(temperature=0, top_k=5).sampling(16, 100, {**QWEN3, "repetition_penalty": 1.1})
    assert (s["temperature"], s["top_k"], s["top_p"], s["repetition_penalty"]) == (0, 5, 0.95, 1.1)
    # No generation config: vLLM's own defaults apply on the worker (None is left out there).
    s = _chat().sampling(16, 100, {})
    assert (s["temperature"], s["top_k"], s["top_p"]) == (None, None, None)


def test_max_tokens_default_and_cap():
    entry = ModelEntry("m", {"context_length": 100, "sampling_defaults": {"max_tokens": 30}})
    assert RequestPath.budget(entry, 10, None) == 30  # the model's default
    assert RequestPath.budget(entry, 80, None) == 20  # within the context
    assert RequestPath.budget(entry, 10, 50) == 50  # a request's own value is not capped
    # --generation-config FOLDER (or an override's max_new_tokens) caps every request, as in vLLM.
    capped = ModelEntry("m", {"context_length": 100, "max_tokens_cap": 8})
    assert RequestPath.budget(capped, 10, 50) == 8 and RequestPath.budget(capped, 10, None) == 8
    with pytest.raises(oa.APIError, match="maximum context length is 100"):
        RequestPath.budget(capped, 60, 50)
