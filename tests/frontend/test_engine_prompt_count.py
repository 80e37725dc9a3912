"""The usage's prompt count is the engine's: an image's placeholder tokens, which only the engine's
processor adds, are counted as vLLM's server counts them; a migrated stream's later worker (its
prompt holds the tokens generated so far) does not count twice."""

from __future__ import annotations

from dynvllm.frontend.postprocess import PostProcessor
from dynvllm.frontend.tokenizer import Tokenizer


def test_the_engines_prompt_count_wins_once(tiny_model):
    tok = Tokenizer(tiny_model)
    ids = tok.encode("red blue cat")
    post = PostProcessor(tok, 1, prompt_tokens=22, stops=[])
    post.feed(
        {"index": 0, "token_ids": ids[:1], "finish_reason": None, "prompt_tokens": 30, "cached_tokens": 0}
    )
    assert post.usage.prompt_tokens == 30
    # A second worker after a migration: its prompt is the first's plus what was generated.
    post.feed(
        {"index": 0, "token_ids": ids[1:], "finish_reason": "length", "prompt_tokens": 31, "cached_tokens": 0}
    )
    assert post.usage.as_dict()["prompt_tokens"] == 30
    assert post.usage.as_dict()["total_tokens"] == 30 + len(ids)
