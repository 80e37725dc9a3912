"""The tiny test model: deterministic, runs in real vLLM, and its outputs depend on the input."""

from __future__ import annotations

import json

from tests.helpers import want_reference

PROMPTS = ["the cat sees a dog", "blue river and old city"]
_GREEDY = [
    {"kind": "completion", "input": p, "params": {"max_tokens": 16, "temperature": 0}, "token_ids": True}
    for p in PROMPTS
]
# The prompts twice (stable across runs), then with the model's own adapter.
REFERENCE = want_reference("tiny", _GREEDY + _GREEDY + [{**r, "lora": "lora"} for r in _GREEDY])


def test_build_is_deterministic(tmp_path):
    from dynvllm.models.tiny import build_tiny_model

    a = build_tiny_model(tmp_path / "a", seed=3)
    b = build_tiny_model(tmp_path / "b", seed=3)
    c = build_tiny_model(tmp_path / "c", seed=4)
    read = lambda p: (p / "model.safetensors").read_bytes()  # noqa: E731
    assert read(a) == read(b)
    assert read(a) != read(c)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["head_dim"] >= 64 and cfg["initializer_range"] == 1.0 and cfg["tie_word_embeddings"] is False


def test_vllm_runs_it_greedy_varies_and_lora_changes_output(references):
    ids = [entry["token_ids"][0] for entry in references[REFERENCE]]
    first, second, lora = ids[0:2], ids[2:4], ids[4:6]
    assert first == second  # stable across runs
    assert first[0] != first[1]  # two prompts, two different continuations
    assert all(len(set(ids)) > 3 for ids in first)  # not one token repeated forever
    assert lora != first  # the adapter is really applied


def test_frontend_tokenizes_as_vllm_does(tiny_model):
    """The frontend reads tokenizer.json itself; vLLM tokenizes through transformers. Any
    difference (digits, spaces, newlines, punctuation, non-ASCII, special tokens) would give the
    engine another prompt than vLLM's own server would."""
    from transformers import AutoTokenizer

    from dynvllm.frontend.tokenizer import Tokenizer

    ours, theirs = Tokenizer(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    texts = [
        "host 3 sends 42 cats and 1234567 dogs",
        "  two  spaces,\ttab\nnew line\r\n\n  indented: x=1; y='it''s'",
        "don't I'll we've THEY'RE café naïve 東京 🙂 e\u0301",
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
        "$$$ ... !!! ??? (a) [b] {c} -- __init__ 3.14e-10",
    ]
    for text in texts:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
