"""Decoding vLLM's KV-cache event batches (pure; no vLLM import).

A ZMQ message has three frames: topic, 8-byte big-endian sequence number, msgpack batch
`[ts, events, dp_rank]`. Events are maps with a `type` key in current vLLM and tag-first arrays
in older releases; both decode to the same small tuples:
    ("stored", block_hashes, parent_hash, token_ids, block_size, lora_name, medium, extra_keys)
    ("removed", block_hashes, medium)
    ("cleared",)
`medium` is the tier named by the engine (None: its GPU cache; see `tiers`); `extra_keys` has one
entry per block (None, or a tuple with `(mm_identifier, offset)` pairs for image blocks) or is
None altogether.
"""

from __future__ import annotations

from typing import Any

import msgpack

Event = tuple


def _hash(value: Any) -> int:
    # Engines send 64-bit ints; some releases send bytes digests. Both key the same way.
    if isinstance(value, (bytes, bytearray)):
        return int.from_bytes(bytes(value[-8:]), "big")
    return int(value)


def _stored(
    block_hashes: list,
    parent: Any,
    token_ids: list,
    block_size: int,
    lora_name: str | None,
    medium: str | None = None,
    extra_keys: list | None = None,
) -> Event:
    return (
        "stored",
        [_hash(h) for h in block_hashes],
        None if parent is None else _hash(parent),
        list(token_ids),
        int(block_size),
        lora_name,
        medium,
        extra_keys or None,
    )


def decode_event(raw: Any) -> Event | None:
    if isinstance(raw, dict):
        kind = raw.get("type")
        if kind == "BlockStored":
            return _stored(
                raw["block_hashes"],
                raw.get("parent_block_hash"),
                raw.get("token_ids") or [],
                raw.get("block_size") or 0,
                raw.get("lora_name"),
                raw.get("medium"),
                raw.get("extra_keys"),
            )
        if kind == "BlockRemoved":
            return ("removed", [_hash(h) for h in raw["block_hashes"]], raw.get("medium"))
        if kind == "AllBlocksCleared":
            return ("cleared",)
        return None
    if isinstance(raw, (list, tuple)) and raw:
        kind = raw[0]
        if kind == "BlockStored":
            # [tag, block_hashes, parent, token_ids, block_size, lora_id, medium, lora_name?...]
            lora_name = raw[7] if len(raw) > 7 and isinstance(raw[7], str) else None
            medium = raw[6] if len(raw) > 6 and isinstance(raw[6], str) else None
            return _stored(raw[1], raw[2], raw[3], raw[4], lora_name, medium)
        if kind == "BlockRemoved":
            medium = raw[2] if len(raw) > 2 and isinstance(raw[2], str) else None
            return ("removed", [_hash(h) for h in raw[1]], medium)
        if kind == "AllBlocksCleared":
            return ("cleared",)
    return None


def decode_batch(payload: bytes) -> tuple[int, list[Event]]:
    """(dp_rank, events) from one msgpack batch; unknown event kinds are skipped."""
    batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    if isinstance(batch, dict):
        events, dp = batch.get("events", []), batch.get("data_parallel_rank")
    else:
        events = batch[1]
        dp = batch[2] if len(batch) > 2 else None
    out = [e for e in (decode_event(r) for r in events) if e is not None]
    return int(dp or 0), out
