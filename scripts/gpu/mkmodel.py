"""Random-weight models and adapters for GPU runs, no hub access.

    mkmodel.py OUTDIR [LAYERS]     Qwen3-0.6B-shaped model + BPE tokenizer
    mkmodel.py OUTDIR 8b           Qwen3-8B-shaped (hidden 4096, 36 layers, 32/8 heads; ~7B params)
    mkmodel.py OUTDIR 4b           Qwen3-4B-shaped (hidden 2560, 36 layers, 32/8 heads; ~3.6B params)
    mkmodel.py lora MODEL OUTDIR   a random rank-8 LoRA adapter on q/k/v/o of MODEL (PEFT format)

Tokenizer: byte-level BPE whose merges are built programmatically (256 bytes + N*N pair merges,
~32k vocab), so no training corpus is needed. Model vocab_size = len(tokenizer)."""

import json
import os
import sys
import time

import torch


def lora(model: str, out: str, rank: int = 8) -> None:
    """PEFT's file layout written directly (peft is not carried): A ~ N(0, 1/in), B ~ N(0, 0.05) so
    the adapter visibly changes greedy output."""
    from safetensors.torch import save_file

    cfg = json.load(open(os.path.join(model, "config.json")))
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or hidden // heads
    shapes = {"q_proj": (hidden, heads * hd), "k_proj": (hidden, kv * hd), "v_proj": (hidden, kv * hd)}
    shapes["o_proj"] = (heads * hd, hidden)
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        for name, (n_in, n_out) in shapes.items():
            pre = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{pre}.lora_A.weight"] = (torch.randn(rank, n_in, generator=g) / n_in**0.5).to(
                torch.bfloat16
            )
            tensors[f"{pre}.lora_B.weight"] = (torch.randn(n_out, rank, generator=g) * 0.05).to(
                torch.bfloat16
            )
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
    adapter = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(shapes),
        "base_model_name_or_path": model,
    }
    json.dump(adapter, open(os.path.join(out, "adapter_config.json"), "w"), indent=2)
    print(f"saved {out}: rank {rank}, {len(tensors)} tensors", flush=True)


if sys.argv[1] == "lora":
    lora(sys.argv[2], sys.argv[3])
    sys.exit(0)

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

out = sys.argv[1]
shape = sys.argv[2] if len(sys.argv) > 2 else "28"
# (hidden, intermediate, attention heads, tied embeddings) of Qwen3-8B, Qwen3-4B and Qwen3-0.6B
hidden, inter, heads, tied = {"8b": (4096, 12288, 32, False), "4b": (2560, 9728, 32, True)}.get(
    shape, (1024, 3072, 16, True)
)
layers = 36 if shape in ("8b", "4b") else int(shape)
t0 = time.time()
os.makedirs(out, exist_ok=True)
alpha = pre_tokenizers.ByteLevel.alphabet()
alpha.sort()
vocab = {c: i for i, c in enumerate(alpha)}
# most frequent-looking chars first: letters, space marker, digits, punctuation
pref = [
    c for c in "ĠetaoinshrdlucmfwypvbgkjqxzETAOINSHRDLUCMFWYPVBGKJQXZ0123456789.,'-:;!?()\"/" if c in vocab
]
rest = [c for c in alpha if c not in pref]
base = (pref + rest)[:178]
merges = []
for a in base:
    for b in base:
        t = a + b
        if t not in vocab:
            vocab[t] = len(vocab)
            merges.append((a, b))
specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
for s in specials:
    vocab[s] = len(vocab)
tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.add_special_tokens(specials)
chat = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
fast = PreTrainedTokenizerFast(
    tokenizer_object=tok,
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    bos_token=None,
    chat_template=chat,
)
fast.save_pretrained(out)
V = len(fast)
cfg = Qwen3Config(
    vocab_size=V,
    hidden_size=hidden,
    intermediate_size=inter,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=tied,
    eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
    bos_token_id=None,
)
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    m = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
m.config.dtype = torch.bfloat16 if hasattr(m.config, "dtype") else None
m.save_pretrained(out)
n = sum(p.numel() for p in m.parameters())
print(f"saved {out}: vocab {V}, layers {layers}, params {n / 1e6:.1f}M, {time.time() - t0:.1f}s", flush=True)
print("roundtrip:", fast.decode(fast("hello world, the quick brown fox")["input_ids"]))
