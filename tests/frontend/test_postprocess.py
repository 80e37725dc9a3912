"""PostProcessor: detokenize, stops, usage and logprobs from wire deltas, with a real tokenizer."""

from __future__ import annotations

import pytest

from dynvllm.frontend.postprocess import PostProcessor
from dynvllm.frontend.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model) -> Tokenizer:
    return Tokenizer(tiny_model)


def _run(post: PostProcessor, deltas: list[dict]) -> tuple[list[str], list]:
    texts = [""] * post.n
    finishes = [None] * post.n
    for d in deltas:
        out = post.feed(d)
        if out is not None:
            texts[out.index] += out.text
            finishes[out.index] = out.finish_reason or finishes[out.index]
    return texts, finishes


def test_text_equals_decoding_all_tokens_at_once(tok):
    ids = tok.encode("the cat sees a dog near the old river")
    post = PostProcessor(tok, 1, prompt_tokens=5, stops=[])
    deltas = [{"index": 0, "token_ids": [t], "finish_reason": None} for t in ids]
    deltas[-1]["finish_reason"] = "length"
    texts, finishes = _run(post, deltas)
    assert texts[0] == tok.decode(ids) and finishes == ["length"]
    assert post.done and post.usage.completion_tokens == len(ids) and post.generated[0] == ids


def test_a_stop_string_split_across_deltas_is_found_and_cut(tok):
    ids = tok.encode("one two three four five")
    post = PostProcessor(tok, 1, prompt_tokens=3, stops=["three"])
    texts, finishes = _run(post, [{"index": 0, "token_ids": [t], "finish_reason": None} for t in ids])
    assert texts[0] == "one two " and finishes == ["stop"] and post.done
    assert post.feed({"index": 0, "token_ids": [ids[0]], "finish_reason": None}) is None  # stopped choice


def test_choices_are_independent_and_abort_maps_to_stop(tok):
    a, b = tok.encode("red blue"), tok.encode("cat dog")
    post = PostProcessor(tok, 2, prompt_tokens=1, stops=[])
    texts, finishes = _run(
        post,
        [
            {"index": 0, "token_ids": a, "finish_reason": None, "prompt_tokens": 1, "cached_tokens": 32},
            {"index": 1, "token_ids": b, "finish_reason": "abort"},
            {"index": 0, "token_ids": [], "finish_reason": "length"},
        ],
    )
    assert texts == [tok.decode(a), tok.decode(b)] and finishes == ["length", "stop"]
    assert post.usage.as_dict()["prompt_tokens_details"] == {"cached_tokens": 32}


def test_logprobs_carry_token_texts(tok):
    ids = tok.encode("cat dog")
    post = PostProcessor(tok, 1, prompt_tokens=1, stops=[])
    raw = [[-0.5, [[ids[0], -0.5], [ids[1], -1.5]]], [-0.25, [[ids[1], -0.25]]]]
    out = post.feed({"index": 0, "token_ids": ids, "finish_reason": "length", "logprobs": raw})
    assert out is not None and out.logprobs is not None
    assert [e[0] for e in out.logprobs] == [tok.decode([t], skip_special_tokens=False) for t in ids]
    assert out.logprobs[0][2][1] == [tok.decode([ids[1]], skip_special_tokens=False), -1.5]


def test_a_choice_index_out_of_range_is_refused(tok):
    from dynvllm.runtime.errors import BadRequest

    with pytest.raises(BadRequest, match="choice 3 of 1"):
        PostProcessor(tok, 1, prompt_tokens=1, stops=[]).feed({"index": 3, "token_ids": [1]})


def test_the_engines_stop_reason_passes_through_and_a_matched_string_replaces_it(tok):
    ids = tok.encode("red blue")
    post = PostProcessor(tok, 1, prompt_tokens=1, stops=[])
    out = post.feed({"index": 0, "token_ids": ids, "finish_reason": "stop", "stop_reason": 7})
    assert out is not None and (out.finish_reason, out.stop_reason) == ("stop", 7)  # a stop token id
    post = PostProcessor(tok, 1, prompt_tokens=1, stops=["blue"], include_stop=True)
    out = post.feed({"index": 0, "token_ids": ids, "finish_reason": None})
    assert out is not None and out.text == tok.decode(ids) and out.text.endswith("blue")
    assert (out.finish_reason, out.stop_reason) == ("stop", "blue")


def test_held_back_text_is_flushed_when_the_engine_finishes(tok):
    ids = tok.encode("the river bends")
    post = PostProcessor(tok, 1, prompt_tokens=1, stops=["the river bends and"])
    texts, finishes = _run(
        post,
        [{"index": 0, "token_ids": ids, "finish_reason": None}, {"index": 0, "finish_reason": "length"}],
    )
    assert texts == [tok.decode(ids)] and finishes == ["length"]  # a stop's prefix is not a stop


def test_prompt_logprob_entries_decode_the_prompt_and_its_alternatives(tok):
    ids = tok.encode("cat dog", add_special_tokens=False)
    post = PostProcessor(tok, 1, prompt_tokens=len(ids), stops=[])
    text = [tok.decode([t], skip_special_tokens=False) for t in ids]
    assert post.prompt_logprob_entries(ids) == [[t, None, None] for t in text]  # none computed
    post.feed(
        {"index": 0, "token_ids": [], "prompt_tokens": 2, "prompt_logprobs": [None, [-1.5, [[ids[0], -0.5]]]]}
    )
    assert post.prompt_logprob_entries(ids) == [[text[0], None, None], [text[1], -1.5, [[text[0], -0.5]]]]


def test_tokens_past_a_stop_string_in_the_same_delta_are_not_counted(tok):
    ids = tok.encode("one two three four five")
    post = PostProcessor(tok, 1, prompt_tokens=3, stops=["three"], include_stop=True)
    out = post.feed({"index": 0, "token_ids": ids, "finish_reason": None})  # one delta: the engine ran on
    assert out is not None and out.text == "one two three" and out.stop_reason == "three"
    upto = next(k for k in range(len(ids)) if "three" in tok.decode(ids[: k + 1]))
    assert out.token_ids == ids[: upto + 1] and post.usage.completion_tokens == upto + 1 < len(ids)


def test_a_token_that_splits_a_character_reads_as_vllms_logprob_text(tok):
    from dynvllm.frontend.postprocess import token_text

    ids = tok.encode("é", add_special_tokens=False)
    assert len(ids) == 2 and tok.decode(ids[:1], skip_special_tokens=False).endswith("\ufffd")
    # As vLLM's engine: "" while the character is incomplete, then the whole character.
    assert token_text(tok, ids[0], []) == "" and token_text(tok, ids[1], ids[:1]) == "é"
    post = PostProcessor(tok, 1, prompt_tokens=1, stops=[])
    out = post.feed(
        {"index": 0, "token_ids": ids, "finish_reason": None, "logprobs": [[-0.1, []], [-0.2, []]]}
    )
    assert out is not None and [e[0] for e in out.logprobs] == ["", "é"]
