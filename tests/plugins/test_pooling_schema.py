"""vLLM's pooling API shapes (pure): score pairing rules, cosine scores, rerank ordering."""

from __future__ import annotations

import pytest

from dynvllm.frontend import bodies
from dynvllm.frontend.errors import RequestError
from dynvllm_plugins.surfaces import pooling_schema as ps


def test_the_four_spellings_of_a_score_request_name_the_same_sides():
    for a, b in (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2")):
        req = bodies.parse_strict(ps.ScoreRequest, f'{{"{a}": "q", "{b}": ["x", "y"]}}'.encode())
        assert req.sides() == (["q"], ["x", "y"])
    with pytest.raises(RequestError, match="queries/documents"):
        bodies.parse_strict(ps.ScoreRequest, b'{"queries": "q"}').sides()
    with pytest.raises(RequestError, match="instruction: this field is not supported"):
        bodies.parse_strict(ps.ScoreRequest, b'{"text_1": "q", "text_2": "d", "instruction": "x"}')


def test_pairs_are_one_to_one_one_to_many_or_many_to_many():
    ps.check_pairs(["q"], ["a", "b"])
    ps.check_pairs(["q", "r"], ["a", "b"])
    with pytest.raises(RequestError, match="1:1, 1:N or N:N"):
        ps.check_pairs(["q", "r"], ["a", "b", "c"])
    with pytest.raises(RequestError, match="text_pair"):
        ps.check_pairs(["q"], [])


def test_scores_are_cosines_and_one_query_serves_every_document():
    vectors = [[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]
    assert ps.pair_scores(vectors, 1) == [1.0, 0.0, -1.0]
    assert ps.pair_scores([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 5.0]], 2) == [1.0, 1.0]
    assert ps.cosine([0.0, 0.0], [1.0, 0.0]) == 0.0  # the clamped norm: no division by zero


def test_rerank_sorts_by_relevance_and_keeps_top_n():
    body = ps.rerank_body("score-x", "m", ["a", "b", "c"], [0.1, 0.9, 0.5], 2, 7)
    assert [r["index"] for r in body["results"]] == [1, 2]
    assert body["results"][0]["document"] == {"text": "b", "multi_modal": None}
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    every = ps.rerank_body("score-x", "m", ["a", "b", "c"], [0.1, 0.9, 0.5], 0, 7)
    assert [r["index"] for r in every["results"]] == [1, 2, 0]


def test_ids_follow_vllms_prefix_rule():
    assert ps.response_id("score", "abc", None) == "score-abc"
    assert ps.response_id("pooling", "abc", "hdr") == "pooling-hdr"
    assert ps.response_id("pooling", None, None).startswith("pooling-")


def test_classify_body_is_vllms_classification_response():
    labels = {"0": "red", "1": "green"}
    body = ps.classify_body(
        "classify-x", "cls", [[0.2, 0.5, 0.3], [0.4, 0.4, 0.2], [0.1, 0.2, 0.7]], labels, 9
    )
    assert [d["label"] for d in body["data"]] == ["green", "red", None]  # ties: the first; no name: null
    assert [d["num_classes"] for d in body["data"]] == [3, 3, 3] and body["data"][2]["index"] == 2
    assert body["object"] == "list" and body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == 9
