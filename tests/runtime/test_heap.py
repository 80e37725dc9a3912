"""The start-up heap frozen: a full collection no longer walks it."""

import gc
import time

from dynvllm import heap


def _full_collection_s() -> float:
    t = time.perf_counter()
    gc.collect()
    return time.perf_counter() - t


def test_freezing_takes_the_startup_heap_out_of_full_collections():
    held = [{"n": [i]} for i in range(300_000)]  # a worker's vLLM, torch and tokenizer, in miniature
    gc.collect()
    walked = _full_collection_s()
    try:
        heap.freeze()
        assert gc.get_freeze_count() >= len(held)
        frozen = _full_collection_s()
    finally:
        gc.unfreeze()
    assert frozen < walked / 5, (frozen, walked)
