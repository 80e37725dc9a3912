"""Tiny random models that real vLLM runs in seconds, for tests, demos and benchmarks.

The weights use `initializer_range=1.0` and untied embeddings: with the default 0.02 a random
model repeats one token forever and cannot tell a right prompt or KV cache from a wrong one.
Everything is deterministic from the seed. Heavy imports happen inside the functions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_WORDS = [
    "the",
    "a",
    "one",
    "two",
    "three",
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "bird",
    "fish",
    "tree",
    "house",
    "river",
    "mountain",
    "city",
    "road",
    "runs",
    "jumps",
    "sleeps",
    "eats",
    "sees",
    "finds",
    "makes",
    "takes",
    "gives",
    "quick",
    "slow",
    "big",
    "small",
    "old",
    "new",
    "happy",
    "sad",
    "and",
    "or",
    "but",
    "if",
    "then",
    "when",
    "where",
    "why",
    "how",
    "what",
    "who",
    "model",
    "token",
    "cache",
    "block",
    "prefix",
    "router",
    "worker",
    "request",
    "stream",
    "decode",
    "prefill",
    "serve",
    "engine",
    "data",
    "value",
    "number",
    "zero",
    "seven",
    "nine",
]


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        out.append(" ".join(words) + rng.choice([".", "?", "!", ",", " 42.", " 3.14"]))
    return out


QWEN2_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tokenizer(path: Path, seed: int = 0, vocab_size: int = 512):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Qwen2's own normalizer and pre-tokenizer (digits one by one): transformers rebuilds a
    # Qwen2 tokenizer with them whatever tokenizer.json says, and vLLM tokenizes through
    # transformers, so tokenizer.json must say the same for every reader to agree.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
    fast.save_pretrained(path)
    return fast


def _qwen2_config(tokenizer, **overrides):
    """The tiny models' shape: 2 layers, hidden 128, head_dim 64, weights drawn wide (std 1.0)
    so that greedy output depends on the prompt."""
    from transformers import Qwen2Config

    fields = dict(
        vocab_size=max(512, len(tokenizer)),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=4096,
        initializer_range=1.0,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16",
    )
    return Qwen2Config(**{**fields, **overrides})


def build_tiny_model(path: str | Path, seed: int = 0, max_position_embeddings: int = 4096) -> Path:
    """Write a tiny Qwen2 model (2 layers, hidden 128, head_dim 64) and its tokenizer to `path`."""
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path, seed)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = _qwen2_config(
        tokenizer,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    GenerationConfig(eos_token_id=eos, bos_token_id=config.bos_token_id).save_pretrained(path)
    return path


#: The tiny classifier's labels (`dynvllm model tiny --classify`).
CLASSIFIER_LABELS = ("red", "green", "blue")
#: The label of a one-label classifier (`--classify --labels 1`): a cross-encoder's relevance.
CROSS_ENCODER_LABEL = "relevant"


def classifier_labels(n: int) -> tuple[str, ...]:
    """The label names of a tiny classifier with `n` labels (1 to 3)."""
    if n == 1:
        return (CROSS_ENCODER_LABEL,)
    if not 2 <= n <= len(CLASSIFIER_LABELS):
        raise ValueError(f"a tiny classifier has 1 to {len(CLASSIFIER_LABELS)} labels, not {n}")
    return CLASSIFIER_LABELS[:n]


def build_tiny_classifier(path: str | Path, seed: int = 0, labels: int = 3) -> Path:
    """Write a tiny Qwen2ForSequenceClassification (the text model's shape and tokenizer, a head
    of `labels` outputs) to `path`: vLLM serves it with the pooling runner and the classify task.
    With one label it is a cross-encoder: vLLM scores (query, document) pairs with it (/score,
    /rerank, `LLM.score`) and its activation is a sigmoid instead of a softmax."""
    import torch
    from transformers import Qwen2ForSequenceClassification

    names = classifier_labels(labels)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path, seed)
    config = _qwen2_config(
        tokenizer,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={label: i for i, label in enumerate(names)},
    )
    torch.manual_seed(seed)
    model = Qwen2ForSequenceClassification(config)
    with torch.no_grad():
        # std 1.0 on a 128-wide input saturates the softmax (or the one label's sigmoid); 0.05
        # keeps the probabilities apart from 0 and 1, so a wrong pooling shows in every one.
        model.score.weight.normal_(0.0, 0.05)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_lora(model_path: str | Path, out: str | Path, seed: int = 0, rank: int = 8) -> Path:
    """Write a random LoRA adapter for the tiny model; its std-0.5 weights visibly change output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = Path(out)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(out)
    # vLLM reads the base model path from the adapter config only for display; keep it local.
    cfg_file = out / "adapter_config.json"
    data = json.loads(cfg_file.read_text())
    data["base_model_name_or_path"] = str(model_path)
    cfg_file.write_text(json.dumps(data, indent=2))
    return out
