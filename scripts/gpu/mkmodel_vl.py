"""mkmodel_vl.py OUTDIR -- a small random-weight Qwen2.5-VL (vision transformer with windowed
attention + 2D rotary, patch merger, M-RoPE language model) with its processor and a chat template
that places images, built locally (no hub). The shape the disaggregated-encoder examples of vLLM
use, small enough to start in seconds.

The language model's weights are drawn wide (std 0.5) so that greedy output depends on the image and
the prompt: with default init a random model repeats one token whatever it is shown. The price is
near-ties: its greedy text follows one-ulp differences of the image embedding (in bf16, one ulp on
a random 10% of the embedding's entries changed 4-5 of the 8 probe images' texts), so two engines
that compute the vision tower with other kernels (an eager encode worker behind a compiled agg)
give other texts without any fault in the hand-off; compare embeddings (mm_embed_probe.py) or run
in float32. Needs torchvision (the image and video processors are transformers' torch ones), so it
is a GPU-host tool; dynvllm's CPU suite uses the tiny BLIP-2 (`dynvllm model tiny --vision`)."""

import json
import sys
import time
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from dynvllm.models.tiny import build_tokenizer

SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build(out: Path) -> None:
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, 0)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}
    eos, bos = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    hidden = 256
    cfg = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": max(512, len(tok)),
            "hidden_size": hidden,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [8, 12, 12],
            },
            "tie_word_embeddings": False,
            "eos_token_id": eos,
            "bos_token_id": bos,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [1],
            "window_size": 112,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=eos,
        bos_token_id=bos,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "visual" not in name:
                p.normal_(0.0, 0.5)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(eos_token_id=eos, bos_token_id=bos).save_pretrained(out)
    json.dump(ids, open(out / "special_ids.json", "w"))
    # 56x56 .. 224x224 pixels: 4 to 64 image tokens after the 2x2 merge.
    size = {"shortest_edge": 56 * 56, "longest_edge": 224 * 224}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(size=size),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {out}: vocab {len(tok)}, params {n / 1e6:.1f}M, {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    build(Path(sys.argv[1]))
