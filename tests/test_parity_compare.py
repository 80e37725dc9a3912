"""The comparison behind scripts/parity_vllm_server.py, on answers recorded from vLLM 0.32's server
and `dynvllm serve agg` (same tiny model, same request): what it ignores, what it reports, and
which differences count as documented."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import paritykit as pk

# chat.stop, recorded 2026-12-04 (content shortened).
VLLM_CHAT = {
    "id": "chatcmpl-a4717031c2c85457",
    "choices": [
        {
            "finish_reason": "stop",
            "index": 0,
            "logprobs": None,
            "message": {"content": "\t prefiow\u0010\ufffd prefid", "role": "assistant", "tool_calls": None},
            "stop_reason": "a",
            "token_ids": None,
        }
    ],
    "created": 1796408686,
    "model": "tiny",
    "object": "chat.completion",
    "system_fingerprint": "vllm-0.32.0-4c47b784",
    "usage": {"completion_tokens": 9, "prompt_tokens": 23, "total_tokens": 32, "prompt_tokens_details": None},
    "prompt_logprobs": None,
}
DYN_CHAT = {
    "id": "chatcmpl-9b3f08ed5338759494af4eada55bf30d",
    "choices": [
        {
            "finish_reason": "stop",
            "index": 0,
            "logprobs": None,
            "message": {"content": "\t prefiow\u0010\ufffd prefid", "role": "assistant", "tool_calls": None},
            "stop_reason": "a",
        }
    ],
    "created": 1796408687,
    "model": "tiny",
    "object": "chat.completion",
    "system_fingerprint": None,
    "usage": {
        "completion_tokens": 9,
        "prompt_tokens": 23,
        "total_tokens": 32,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": None},
    },
}


def test_ids_clocks_and_nulls_are_ignored_and_the_cache_count_is_reported_as_documented():
    diffs = pk.compare(VLLM_CHAT, DYN_CHAT)
    assert diffs == [pk.Diff("usage.prompt_tokens_details.cached_tokens", pk.MISSING, pk.CACHED)]
    assert pk.verdict("chat.stop", diffs[0]) == "documented"
    assert pk.compare({**VLLM_CHAT, "id": "other", "created": 1}, VLLM_CHAT) == []


def test_a_changed_text_count_or_stop_reason_is_an_undocumented_difference():
    for path, value in (("content", "\t prefiow"), ("stop_reason", None), ("completion_tokens", 10)):
        dyn = {**DYN_CHAT, "choices": [dict(DYN_CHAT["choices"][0])], "usage": dict(DYN_CHAT["usage"])}
        if path == "content":
            dyn["choices"][0]["message"] = {**dyn["choices"][0]["message"], "content": value}
        elif path == "stop_reason":
            dyn["choices"][0]["stop_reason"] = value
        else:
            dyn["usage"]["completion_tokens"] = value
        [row, *_] = [r for r in pk.group(pk.compare(VLLM_CHAT, dyn)) if "cached" not in r.field]
        assert pk.verdict("chat.stop", row) == "DIFFERENT", row


def test_logprobs_compare_within_tolerance_and_rows_group_by_field_pattern():
    a = {"lp": [{"token": "a", "logprob": -0.5}, {"token": "b", "logprob": -1.0}]}
    assert (
        pk.compare(a, {"lp": [{"token": "a", "logprob": -0.50005}, {"token": "b", "logprob": -1.00009}]})
        == []
    )
    moved = {"lp": [{"token": "", "logprob": -0.6}, {"token": "", "logprob": -1.0}]}
    rows = pk.group(pk.compare(a, moved))
    assert [(r.field, r.count) for r in rows] == [("lp[*].token", 2), ("lp[*].logprob", 1)]
    assert pk.pattern("prompt_logprobs[3].474.rank") == "prompt_logprobs[*].*.rank"
    # ints and bools are exact
    assert not pk.same_value(1, 2) and not pk.same_value(True, 1) and pk.same_value(1, 1.00001)


def test_errors_compare_by_status_and_type_and_the_type_names_are_documented():
    vllm = {
        "error": pk.summarize_error(404, {"error": {"type": "NotFoundError", "message": "x"}}),
        "_message": "x",
    }
    dyn = {"error": pk.summarize_error(404, {"error": {"type": "invalid_request_error"}}), "_message": "y"}
    [d] = pk.compare(vllm, dyn)  # the wording is shown, not compared
    assert d.field == "error.error_type" and pk.verdict("bad.unknown_model", d) == "documented"
    other = {"error": pk.summarize_error(400, {"error": {"type": "invalid_request_error"}})}
    [d] = pk.compare(vllm | {"error": {**vllm["error"], "error_type": "invalid_request_error"}}, other)
    assert d.field == "error.status" and pk.verdict("bad.unknown_model", d) == "DIFFERENT"


def test_streams_are_summarized_as_a_client_assembles_them():
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}, "logprobs": {"content": [{"token": "Hel"}]}}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop", "stop_reason": "x"}]},
        {"choices": [], "usage": {"completion_tokens": 2}},
    ]
    [c] = pk.summarize_chat_stream(chunks)["choices"]
    assert (c["text"], c["role"], c["finish_reason"], c["chunks"]) == ("Hello", "assistant", "stop", 3)
    assert pk.summarize_chat_stream(chunks)["usage"] == {"completion_tokens": 2}
    events = [{"type": "a"}, {"type": "d"}, {"type": "d"}, {"type": "done", "x": 1}]
    assert pk.summarize_events(events, ("done",)) == {"events": ["a", "d", "done"], "final": events[-1]}


def test_a_multi_call_answers_fields_share_one_row():
    assert pk.unwrap("final.response.usage.total_tokens") == "usage.total_tokens"
    assert pk.unwrap("second.store") == pk.unwrap("retrieved.store") == "store"
    assert pk.unwrap("choices[*].text") == "choices[*].text"
