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
    with pytest.raises(RequestError, match="padding: this field is not supported"):
        bodies.parse_strict(ps.ScoreRequest, b'{"text_1": "q", "text_2": "d", "padding": "max_length"}')


def test_a_score_templates_arguments_merge_as_vllms():
    def req(extra: str) -> ps.RerankRequest:
        return bodies.parse_strict(ps.RerankRequest, f'{{"query": "q", "documents": "d"{extra}}}'.encode())

    assert req("").template_kwargs() == {} and req("").template_fields() == []
    got = req(', "instruction": "i", "chat_template_kwargs": {"x": 1}')
    assert got.template_kwargs() == {"x": 1, "instruction": "i"}
    assert got.template_fields() == ["instruction", "chat_template_kwargs"]
    # An empty chat_template_kwargs asks nothing of a template (vLLM accepts it without one).
    assert req(', "chat_template_kwargs": {}').template_fields() == []
    # chat_template_kwargs' own instruction wins over the field
    assert req(', "instruction": "i", "chat_template_kwargs": {"instruction": "k"}').template_kwargs() == {
        "instruction": "k"
    }
    with pytest.raises(RequestError, match="reserved keys"):
        req(', "chat_template_kwargs": {"tools": []}').template_kwargs()


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


@pytest.fixture(scope="module")
def pair_tokenizers(tmp_path_factory):
    """(dynvllm's Tokenizer, transformers' tokenizer) of two folders: the tiny model's tokenizer
    (no pair template: the texts' ids one after the other) and a BERT-style one whose pair
    template puts [CLS] ... [SEP] ... [SEP] around the texts."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from dynvllm.frontend.tokenizer import Tokenizer
    from dynvllm.models.tiny import build_tokenizer

    qwen = tmp_path_factory.mktemp("qwen")
    build_tokenizer(qwen)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sees", "a", "dog", "red", "fish"]
    bert_tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    bert_tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bert_tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    # Hub files often keep the truncation and padding of the trainer's last call; transformers
    # (and so vLLM) sets its own on each call, so a prompt never carries them.
    bert_tok.enable_truncation(max_length=6)
    bert_tok.enable_padding(pad_id=0, pad_token="[PAD]", length=16)
    bert = tmp_path_factory.mktemp("bert")
    PreTrainedTokenizerFast(
        tokenizer_object=bert_tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]"
    ).save_pretrained(bert)
    return [(Tokenizer(f), AutoTokenizer.from_pretrained(f)) for f in (qwen, bert)]


PAIRS = [("the cat sees a dog", "a dog sees the cat"), ("red fish", "the cat"), ("one", "")]


def test_a_cross_encoder_pair_is_tokenized_as_transformers_pairs_it(pair_tokenizers):
    """vLLM's cross-encoder prompt is `tokenizer(text=query, text_pair=document)`."""
    for ours, theirs in pair_tokenizers:
        for q, d in PAIRS:
            want = theirs(text=q, text_pair=d, add_special_tokens=True)["input_ids"]
            assert ps.cross_encoder_prompt(ours, q, d, sep=True) == want
    bert, _ = pair_tokenizers[1]
    assert ps.cross_encoder_prompt(bert, "red fish", "the cat", sep=True) == [2, 9, 10, 3, 4, 5, 3]
    # A language model converted to a reranker (use_sep_token false): the texts as one.
    ours, theirs = pair_tokenizers[0]
    q, d = PAIRS[0]
    assert ps.cross_encoder_prompt(ours, q, d, sep=False) == theirs(q + d)["input_ids"]
    assert ps.cross_encoder_prompt(bert, "red fish", "the cat", sep=False) == [2, 9, 1, 5, 3]


def test_cross_encoder_pairs_and_scores():
    assert ps.pairs(["q"], ["a", "b"]) == [("q", "a"), ("q", "b")]
    assert ps.pairs(["q", "r"], ["a", "b"]) == [("q", "a"), ("r", "b")]
    assert ps.cross_scores([[0.25], [0.75]]) == [0.25, 0.75]
    with pytest.raises(ValueError, match="one value"):
        ps.cross_scores([[0.2, 0.8]])


SCORE_TEMPLATE = (
    "{% if instruction %}<|im_start|>system\n{{ instruction }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{{ eos_token }}"
)


def test_a_score_template_renders_as_transformers_renders_the_pair(pair_tokenizers):
    """vLLM renders a score template with transformers' `apply_chat_template` (messages query
    and document, as given) and tokenizes the text with the special tokens."""
    ours, theirs = pair_tokenizers[0]
    q, d = PAIRS[0]
    messages = [{"role": "query", "content": q}, {"role": "document", "content": d}]
    for kwargs in ({}, {"instruction": "judge"}, {"instruction": "judge", "add_generation_prompt": True}):
        want = theirs.apply_chat_template(messages, chat_template=SCORE_TEMPLATE, tokenize=False, **kwargs)
        assert ps.score_template_text(SCORE_TEMPLATE, ours.special_tokens, q, d, kwargs) == want
        ids = ps.cross_encoder_prompt(ours, q, d, True, SCORE_TEMPLATE, kwargs)
        assert ids == theirs(want)["input_ids"]
    assert "judge" in want and want.endswith("<|im_start|>assistant\n<|im_end|>")
    with pytest.raises(RequestError, match="score template failed"):
        ps.score_template_text("{{ raise_exception('no') }}", {}, q, d, {})


def test_how_a_model_scores_follows_its_workers_card():
    """An embedding model is a bi-encoder; a one-label classifier's card makes a cross-encoder;
    other classifiers, and cross-encoders whose prompts the frontend cannot build, are named."""
    import asyncio
    from types import SimpleNamespace

    from dynvllm_plugins.surfaces.pooling import PoolingSurface

    def scorer(card: dict) -> dict | None:
        async def entry(_name: str) -> SimpleNamespace:
            return SimpleNamespace(card=card)

        surface = PoolingSurface.__new__(PoolingSurface)
        surface.path = SimpleNamespace(entry=entry)
        return asyncio.run(surface._scorer("m"))

    assert scorer({"pooling_tasks": ["embed", "token_embed"]}) is None
    cross = {"sep": True, "unserved": None}
    assert scorer({"pooling_tasks": ["classify"], "labels": {"0": "x"}, "cross_encoder": cross}) == cross
    with pytest.raises(RequestError, match="with 3 labels"):
        scorer({"pooling_tasks": ["classify"], "labels": {"0": "a", "1": "b", "2": "c"}})
    # A late-interaction model is no classifier: the refusal says what it serves, not /classify.
    with pytest.raises(RequestError, match=r"pooling tasks \['token_embed'\].*late interaction") as late:
        scorer({"pooling_tasks": ["token_embed"]})
    assert "/classify" not in late.value.message
    with pytest.raises(RequestError, match="token type ids"):
        scorer({"pooling_tasks": ["classify"], "cross_encoder": {"sep": True, "unserved": "token type ids"}})
