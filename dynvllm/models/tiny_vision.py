"""A tiny random BLIP-2 (vision transformer, Q-Former, OPT language model) that vLLM runs on CPU.

Its image processor is transformers' PIL one, so nothing needs torchvision. The language model's
weights are drawn wide (std 1.0) so that greedy output depends on the image and the prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

IMAGE_TOKEN = "<image>"
NUM_QUERY_TOKENS = 8
IMAGE_SIZE = 56
#: BLIP-2 takes a plain "Question: ... Answer:" prompt and its processor puts the image tokens
#: before it, so the template walks each message's parts for their text (vLLM and dynvllm then
#: pass images as parts) and leaves the images' place to the processor.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = namespace(s='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{%- set text.s = text.s + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = text.s -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ 'Question: ' + text + ' Answer:' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ' + text + '\\n' }}"
    "{%- else -%}{{ text + '\\n' }}{%- endif -%}"
    "{%- endfor -%}"
)


def build_tiny_vision_model(path: str | Path, seed: int = 0) -> Path:
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        GenerationConfig,
        OPTConfig,
    )
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from dynvllm.models.tiny import build_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path, seed)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = OPTConfig(
        vocab_size=max(512, len(tokenizer)),
        hidden_size=128,
        ffn_dim=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        word_embed_proj_dim=128,
        max_position_embeddings=2048,
        init_std=1.0,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = Blip2VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=14,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        encoder_hidden_size=64,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token,
        initializer_factor=1.0,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():  # a wide language model and projection: output follows image and prompt
        for module in (model.language_model, model.language_projection):
            for p in module.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 1.0)
    model.save_pretrained(path, safe_serialization=True)
    GenerationConfig(eos_token_id=eos, bos_token_id=bos).save_pretrained(path)
    processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor.save_pretrained(path)
    pre = path / "preprocessor_config.json"
    data = json.loads(pre.read_text())
    data["processor_class"] = "Blip2Processor"
    pre.write_text(json.dumps(data, indent=2))
    (path / "processor_config.json").write_text(
        json.dumps(
            {
                "num_query_tokens": NUM_QUERY_TOKENS,
                "image_token": IMAGE_TOKEN,
                "processor_class": "Blip2Processor",
            }
        )
    )
    return path
