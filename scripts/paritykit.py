"""Pure comparison of two servers' answers to the same request (scripts/parity_vllm_server.py).

`normalize` drops what differs between any two runs of one server (ids, timestamps, the
fingerprint) and null fields; `summarize_*` reduce a stream to what a client sees (text, tool
calls, finish reasons, usage and the sequence of event types); `compare` lists every field whose
value differs, floats within a tolerance. `DOCUMENTED` holds the differences that are deliberate
(docs/compatibility.md, "Parity with vLLM's server"); `verdict` names each row's status.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: Keys whose values are fresh per request on any server (ids, clocks, build stamps).
VOLATILE = frozenset(
    {
        "id",
        "created",
        "created_at",
        "completed_at",
        "system_fingerprint",
        "item_id",
        "call_id",
        "tool_call_id",
        "tool_use_id",
        "previous_response_id",
        "response_id",
    }
)
TOLERANCE = 1e-4

#: Counts that depend on what each server's prefix cache holds (the order and number of
#: requests it served before): compared as present or absent, not by value.
CACHE_STATE = frozenset({"cached_tokens", "cache_read_input_tokens"})
CACHED = "<cache count>"

_RESP = "resp.*"
#: (case glob, field glob) -> why the difference is there; the same rows are in
#: docs/compatibility.md's "Parity with vLLM's server" table.
DOCUMENTED: dict[tuple[str, str], str] = {
    ("*", "*error.error_type"): "OpenAI's (Anthropic's) error types; vLLM names its exception classes",
    ("*", "*usage.prompt_tokens_details.cached_tokens"): "prefix-cache hits always reported",
    ("msg.*", "*usage.cache_read_input_tokens"): "prefix-cache hits always reported",
    ("chat.tools_named", "choices[*].message.content"): "named/required calls forced as JSON",
    ("chat.tools_required", "choices[*].message.content"): "named/required calls forced as JSON",
    ("*", "*prompt_logprobs[*].*.rank"): "no rank in prompt logprobs",
    ("resp.stream", "events[*]"): "response.incomplete event when max_output_tokens cut it",
    ("resp.stream", "final.type"): "response.incomplete event when max_output_tokens cut it",
    ("resp.stream", "final.sequence_number"): "response.incomplete event when max_output_tokens cut it",
    (_RESP, "*tool_choice"): "OpenAI's defaults echoed",
    (_RESP, "*service_tier"): "OpenAI's defaults echoed",
    (_RESP, "*metadata"): "OpenAI's defaults echoed",
    (_RESP, "*reasoning"): "OpenAI's defaults echoed",
    (_RESP, "*text.format.type"): "OpenAI's defaults echoed",
    (_RESP, "*text.verbosity"): "OpenAI's defaults echoed",
    (_RESP, "*top_logprobs"): "OpenAI's defaults echoed",
    (_RESP, "*store"): "OpenAI's defaults echoed",
    (_RESP, "*output[*].content[*].logprobs"): "OpenAI's defaults echoed",
    (_RESP, "*presence_penalty"): "vLLM's extra Response fields",
    (_RESP, "*frequency_penalty"): "vLLM's extra Response fields",
    (_RESP, "*usage.input_tokens_details.cache_write_tokens"): "vLLM's extra Response fields",
    (_RESP, "*usage.*_per_turn"): "vLLM's extra Response fields",
    (_RESP, "*usage.output_tokens_details.tool_output_tokens"): "vLLM's extra Response fields",
    ("*", "choices[*].chunks"): "chunk count depends on timing on both servers",
    ("msg.count_tokens", "context_management.original_input_tokens"): "vLLM's beta field not sent",
}


def normalize(value: Any) -> Any:
    """The value with volatile keys, null fields and shown-only keys (`_message`: an error's
    wording) dropped, recursively (a client reading either server through the SDKs' models
    cannot tell a null field from an absent one)."""
    if isinstance(value, dict):
        return {
            k: CACHED if k in CACHE_STATE else normalize(v)
            for k, v in value.items()
            if k not in VOLATILE and v is not None and not str(k).startswith("_")
        }
    if isinstance(value, list | tuple):
        return [normalize(v) for v in value]
    return value


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a.b[0].c": leaf}` of a JSON value; empty containers stay as leaves."""
    out: dict[str, Any] = {}
    if isinstance(value, dict) and value:
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
    else:
        out[prefix or "$"] = value
    return out


def same_value(a: Any, b: Any, tol: float = TOLERANCE) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        if isinstance(a, int) and isinstance(b, int):
            return a == b
        if math.isinf(a) or math.isinf(b) or math.isnan(a) or math.isnan(b):
            return (a == b) or (math.isnan(a) and math.isnan(b))
        return abs(a - b) <= tol
    return a == b


MISSING = "<absent>"


@dataclass(frozen=True)
class Diff:
    field: str
    vllm: Any
    dynvllm: Any


def compare(vllm: Any, dyn: Any, tol: float = TOLERANCE) -> list[Diff]:
    """Every field (flattened path) whose normalized values differ, in vLLM's order then dynvllm's."""
    a, b = flatten(normalize(vllm)), flatten(normalize(dyn))
    diffs = [
        Diff(k, v, b.get(k, MISSING)) for k, v in a.items() if k not in b or not same_value(v, b[k], tol)
    ]
    diffs += [Diff(k, MISSING, v) for k, v in b.items() if k not in a]
    return diffs


def pattern(path: str) -> str:
    """A flattened path with list indexes and numeric keys (token ids of vLLM's
    `prompt_logprobs`) written as `*`: one row of the table for a field of every element."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", re.sub(r"\[\d+\]", "[*]", path))


#: The keys under which a request of several calls (store then retrieve, a chained second
#: response, a stream's final event) holds each answer.
WRAPPERS = re.compile(r"^(first|second|created|retrieved|final)\.(response\.)?")


def unwrap(path: str) -> str:
    """A field's path without the wrapper of a multi-call answer: one table row for the field
    of every answer that has it."""
    return WRAPPERS.sub("", path)


@dataclass(frozen=True)
class Row:
    field: str  # a pattern()
    count: int  # how many differing fields it stands for
    vllm: Any  # the first one's values
    dynvllm: Any


def group(diffs: list[Diff]) -> list[Row]:
    """Diffs merged by field pattern, in first-seen order."""
    rows: dict[str, Row] = {}
    for d in diffs:
        key = pattern(d.field)
        if key in rows:
            r = rows[key]
            rows[key] = Row(key, r.count + 1, r.vllm, r.dynvllm)
        else:
            rows[key] = Row(key, 1, d.vllm, d.dynvllm)
    return list(rows.values())


def collapse(types: Iterable[str]) -> list[str]:
    """Event types with each run of one type written once: how many deltas a server sends
    depends on timing (both merge engine outputs when they lag), the order of kinds is what a
    client's state machine reads."""
    out: list[str] = []
    for t in types:
        if not out or out[-1] != t:
            out.append(t)
    return out


def summarize_chat_stream(chunks: list[dict]) -> dict:
    """What a client assembles from chat/completions chunks: per choice the text, role, tool
    calls, logprobs, finish reason and token ids; the usage chunk; the chunk objects."""
    choices: dict[int, dict] = {}
    usage = None
    extra: dict[str, Any] = {}
    for chunk in chunks:
        if chunk.get("usage"):
            usage = chunk["usage"]
        if chunk.get("prompt_token_ids") is not None:
            extra["prompt_token_ids"] = chunk["prompt_token_ids"]
        for c in chunk.get("choices") or []:
            acc = choices.setdefault(c["index"], {"text": "", "logprobs": [], "tool_calls": {}, "chunks": 0})
            acc["chunks"] += 1
            delta = c.get("delta")
            if delta is None:  # completions
                acc["text"] += c.get("text") or ""
                lp = c.get("logprobs") or {}
                acc["logprobs"] += list(
                    zip(lp.get("tokens") or [], lp.get("token_logprobs") or [], strict=False)
                )
                if c.get("prompt_token_ids") is not None:
                    acc["prompt_token_ids"] = c["prompt_token_ids"]
            else:
                if delta.get("role"):
                    acc["role"] = delta["role"]
                acc["text"] += delta.get("content") or ""
                if delta.get("reasoning") or delta.get("reasoning_content"):
                    acc["reasoning"] = acc.get("reasoning", "") + (
                        delta.get("reasoning") or delta.get("reasoning_content") or ""
                    )
                for tc in delta.get("tool_calls") or []:
                    call = acc["tool_calls"].setdefault(tc.get("index", 0), {"name": "", "arguments": ""})
                    fn = tc.get("function") or {}
                    call["name"] += fn.get("name") or ""
                    call["arguments"] += fn.get("arguments") or ""
                acc["logprobs"] += (c.get("logprobs") or {}).get("content") or []
            if c.get("token_ids"):
                acc["token_ids"] = acc.get("token_ids", []) + list(c["token_ids"])
            if c.get("finish_reason"):
                acc["finish_reason"] = c["finish_reason"]
    for acc in choices.values():
        acc["tool_calls"] = [acc["tool_calls"][i] for i in sorted(acc["tool_calls"])]
    return {"choices": [choices[i] for i in sorted(choices)], "usage": usage, **extra}


def summarize_events(events: list[dict], final_types: tuple[str, ...]) -> dict:
    """A typed event stream (Responses, Anthropic Messages): the collapsed sequence of types and
    the payload of the last event whose type is in `final_types`."""
    final = None
    for e in events:
        if e.get("type") in final_types:
            final = e
    return {"events": collapse(e.get("type", "?") for e in events), "final": final}


def summarize_error(status: int, body: Any) -> dict:
    """An error answer as compared: the status and the error's type (OpenAI's `error.type`,
    Anthropic's `error.type`); the message wording is shown, not compared."""
    err = body.get("error") if isinstance(body, dict) else None
    kind = err.get("type") if isinstance(err, dict) else None
    return {"status": status, "error_type": kind}


def documented(case: str, field: str) -> str | None:
    for (case_glob, field_glob), why in DOCUMENTED.items():
        if fnmatch.fnmatchcase(case, case_glob) and fnmatch.fnmatchcase(
            pattern(field), field_glob.replace("[", "[[]")
        ):
            return why
    return None


def verdict(case: str, diff: Diff | Row | None) -> str:
    """`same`, `documented` or `DIFFERENT` for one row of the table."""
    if diff is None:
        return "same"
    return "documented" if documented(case, diff.field) else "DIFFERENT"


def short(value: Any, width: int = 48) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = text.replace("\n", "\\n").replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"
