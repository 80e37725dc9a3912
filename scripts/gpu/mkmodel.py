"""mkmodel.py OUTDIR [LAYERS] -- random-weight Qwen3-0.6B-shaped model + BPE tokenizer, no hub access.
Tokenizer: byte-level BPE whose merges are built programmatically (256 bytes + N*N pair merges,
~32k vocab), so no training corpus is needed. Model vocab_size = len(tokenizer)."""

import os
import sys
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

out = sys.argv[1]
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 28
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
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=layers,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
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
