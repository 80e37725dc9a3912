"""Image-aware block keys: the frontend's prediction meets the keys workers make from events."""

from __future__ import annotations

from dynvllm.router import hashing
from dynvllm.router.block_keys import BlockKeys
from dynvllm.router.image_keys import place
from dynvllm.router.kv_events import decode_event

BS = 4
IMG = 9000  # the placeholder token
RULE = {"token_id": IMG, "count": 6}
A, B = b"png bytes of one image", b"png bytes of another"


def _engine_event(tokens: list[int], images: list[tuple[int, int, bytes]]) -> tuple:
    """A BlockStored event as vLLM publishes it for `tokens` (placeholders expanded), images at
    (offset, length, bytes) and named by the worker's `multi_modal_uuids`: `extra_keys` lists,
    per block, (identifier, offset relative to the block) for each image overlapping it."""
    n = len(tokens) // BS
    extra = []
    for b in range(n):
        start, end = b * BS, b * BS + BS
        pairs = [
            (hashing.image_uuid(hashing.image_hash(data)), off - start)
            for off, length, data in images
            if off < end and off + length > start
        ]
        extra.append(tuple(pairs) or None)
    return decode_event(
        {
            "type": "BlockStored",
            "block_hashes": list(range(1000, 1000 + n)),
            "parent_block_hash": None,
            "token_ids": tokens[: n * BS],
            "block_size": BS,
            "lora_name": None,
            "medium": "GPU",
            "extra_keys": extra,
        }
    )


def test_prediction_equals_the_keys_from_the_engine_events_images_first():
    text = list(range(1, 15))
    predicted = place(text, [A], RULE, BS).keys(BS, None)
    relayed = BlockKeys().translate(_engine_event([IMG] * 6 + text, [(0, 6, A)]))
    assert relayed is not None
    assert predicted == relayed[1] and len(predicted) == 5


def test_prediction_equals_the_keys_from_the_engine_events_with_markers():
    text = [1, 2, 3, 4, 5, IMG, 6, 7, 8, 9, 10, IMG, 11, 12]  # LLaVA-style: one marker per image
    predicted = place(text, [A, B], RULE, BS).keys(BS, None)
    engine = [1, 2, 3, 4, 5, *[IMG] * 6, 6, 7, 8, 9, 10, *[IMG] * 6, 11, 12]
    relayed = BlockKeys().translate(_engine_event(engine, [(5, 6, A), (16, 6, B)]))
    assert relayed is not None and predicted == relayed[1]
    # The text before the first image is shared with a text-only prompt; no block after it is.
    plain = hashing.chain(text, BS)
    assert predicted[0] == plain[0] and predicted[1] != plain[1]


def test_same_text_other_image_shares_nothing_same_image_shares_all():
    text = list(range(1, 30))
    a = place(text, [A], RULE, BS).keys(BS, None)
    again = place(text, [A], RULE, BS).keys(BS, None)
    b = place(text, [B], RULE, BS).keys(BS, None)
    assert a == again
    assert not set(a) & set(b)
    assert not set(a) & set(hashing.chain(text, BS))  # nor with the text alone


def test_without_a_rule_images_root_the_chain():
    text = list(range(1, 30))
    a = place(text, [A], None, BS).keys(BS, None)
    assert a == place(text, [A], None, BS).keys(BS, None)
    assert not set(a) & set(place(text, [B], None, BS).keys(BS, None))
    assert not set(a) & set(hashing.chain(text, BS))
    assert not set(a) & set(place(text, [A], None, BS).keys(BS, "adapter"))


def test_identifiers_from_events():
    h = hashing.image_hash(A)
    assert hashing.mm_identifier(hashing.image_uuid(h)) == h
    assert hashing.mm_identifier("sql:" + hashing.image_uuid(h)) == h  # vision-tower adapters
    other = hashing.mm_identifier("a-hash-vllm-computed-itself")
    assert other == hashing.mm_identifier("a-hash-vllm-computed-itself") and other != h
    # Salts and adapter names among the extra keys do not enter the key.
    assert hashing.event_extras([("salt",), None]) is None
    assert hashing.event_extras([("sql", ("00000000000000ff", -3))]) == [(255, -3)]
