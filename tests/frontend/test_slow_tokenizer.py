"""A model without tokenizer.json (a slow tokenizer, as transformers loads it) is served: the
tiny model's byte-level BPE saved as GPT-2's slow files encodes, decodes, streams text and renders
its chat template as the fast one does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dynvllm.frontend.tokenizer import Tokenizer

TEXT = "the cat sees a dog, 猫 and 🙂 <|im_end|> ok"


@pytest.fixture(scope="module")
def slow_folder(tiny_model, tmp_path_factory) -> Path:
    from tokenizers import Tokenizer as Fast

    out = tmp_path_factory.mktemp("slow")
    fast = Fast.from_file(str(tiny_model / "tokenizer.json"))
    fast.model.save(str(out))  # vocab.json, merges.txt
    config = json.loads((tiny_model / "tokenizer_config.json").read_text())
    added = {
        str(i): {"content": t.content, "special": t.special, "lstrip": False, "rstrip": False}
        | {"normalized": False, "single_word": False}
        for i, t in fast.get_added_tokens_decoder().items()
    }
    slow = {"tokenizer_class": "GPT2Tokenizer", "added_tokens_decoder": added}
    slow |= {k: config[k] for k in ("eos_token", "pad_token")}
    (out / "tokenizer_config.json").write_text(json.dumps(slow))
    shutil.copy(tiny_model / "chat_template.jinja", out / "chat_template.jinja")
    return out


def test_a_slow_tokenizer_works_as_the_fast_one(tiny_model, slow_folder):
    fast, slow = Tokenizer(tiny_model), Tokenizer(slow_folder)
    assert not (slow_folder / "tokenizer.json").exists() and slow._slow is not None
    ids = fast.encode(TEXT, add_special_tokens=False)
    assert slow.encode(TEXT, add_special_tokens=False) == ids
    assert slow.decode(ids, skip_special_tokens=False) == fast.decode(ids, skip_special_tokens=False)
    for skip in (True, False):
        a, b = fast.decode_stream(skip), slow.decode_stream(skip)
        streamed = "".join(b.step(t) for t in ids)
        assert streamed == "".join(a.step(t) for t in ids) and "猫" in streamed
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert slow.apply_chat_template(messages, add_generation_prompt=True) == fast.apply_chat_template(
        messages, add_generation_prompt=True
    )
    assert slow.eos_token == fast.eos_token == "<|im_end|>"
