"""mm_embed_probe.py MODEL OUTFILE [LABEL] -- the image embeddings an encode worker hands over vs
the ones the language worker computes itself, bit for bit, on this host's vLLM.

Each engine runs offline as an encoder-cache producer, so it stores the embedding of every image
it encodes (mm_probe.py's 8 probe images, 112x112, one request each, keyed as dynvllm keys them):
  agg          the language worker's engine as `serve agg` starts it (vLLM's defaults: compiled)
  encode       the encode role's engine: encoder-only, compiled as the language workers are,
               without CUDA graphs
  encode-plain the same eager, as vLLM's disaggregated-encoder examples run it (the encode role
               before 2026-12-05: one bf16 step off agg on Qwen2.5-VL)
Prints and appends one JSON line: per configuration, how many images are bit-equal to agg's
and the largest difference. Greedy texts of a random model follow one-ulp differences (see
mkmodel_vl.py), so this is the check that tells the hand-off from numerics. vLLM's dtype is the
model's (EXTRA_ARGS="--dtype float32" for another)."""

import base64
import dataclasses
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

#: agg first: the others are compared with it. PROBE_CONFIGS="agg encode" skips the eager one.
CONFIGS = tuple(os.environ.get("PROBE_CONFIGS", "agg encode encode-plain").split())


def probe_images() -> list[bytes]:
    import mm_probe  # beside this script, first on sys.path

    return [base64.b64decode(mm_probe.image(i, 112).split(",", 1)[1]) for i in range(8)]


def encode_all(model: str, config: str, folder: str) -> None:
    """One engine of `config` stores the embeddings of the probe images in `folder`."""
    from PIL import Image
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs

    from dynvllm import settings as S
    from dynvllm.router.hashing import image_hash, image_uuid
    from dynvllm.worker.engine_args import parse_engine_args
    from dynvllm_plugins.roles import encoder_cache
    from dynvllm_plugins.roles.encode import ENCODER_ONLY
    from dynvllm_plugins.roles.encoder_kernels import encoder_kernels

    extra = shlex.split(os.environ.get("EXTRA_ARGS", ""))
    settings = S.build_settings(
        {"engine": {"model": model, "max_model_len": 1024}, "encode": {"encoder_cache_dir": folder}},
        extra_engine_args=extra,
    )
    overrides = encoder_cache.engine_overrides(settings, "ec_producer")
    if config != "agg":
        overrides.update(ENCODER_ONLY)
    else:
        # An encoder-cache producer registers no language-model attention, so capturing CUDA
        # graphs fails (KeyError on layer 0's attention, seen on an H200). Compiled without graphs,
        # the engine still picks its ops as a compiled agg engine does: what the images meet there.
        overrides["compilation_config"] = {"cudagraph_mode": "NONE"}
        # Nor has it an attention group for prefix caching to coordinate (vLLM 0.26 on an H100:
        # "HybridKVCacheCoordinator requires at least two attention groups"). Caching prefixes
        # never touches how an image is encoded.
        overrides["enable_prefix_caching"] = False
    if config == "encode":
        overrides.update(encoder_kernels(settings))
    elif config == "encode-plain":
        overrides["enforce_eager"] = True  # as vLLM's disaggregated-encoder examples run it
    args = parse_engine_args(settings, overrides)
    llm = LLM(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs)})
    tok = AutoTokenizer.from_pretrained(model)
    for i, data in enumerate(probe_images()):
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": f"describe picture {i}"}],
            }
        ]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        request = {
            "prompt": prompt,
            "multi_modal_data": {"image": Image.open(io.BytesIO(data)).convert("RGB")},
            "multi_modal_uuids": {"image": [image_uuid(image_hash(data))]},
        }
        llm.generate([request], SamplingParams(max_tokens=1), use_tqdm=False)


def compare(folders: dict[str, str]) -> dict:
    import torch
    from safetensors.torch import load_file

    from dynvllm.router.hashing import image_hash, image_uuid

    keys = [image_uuid(image_hash(d)) for d in probe_images()]

    def load(config: str, key: str):
        path = Path(folders[config]) / key / "encoder_cache.safetensors"
        return load_file(path)["ec_cache"] if path.exists() else None

    agg = {key: load("agg", key) for key in keys}
    out: dict = {}
    for config in CONFIGS[1:]:
        equal, worst, missing = 0, 0.0, 0
        for key in keys:
            a, b = agg[key], load(config, key)
            if a is None or b is None or a.shape != b.shape:
                missing += 1
                continue
            equal += bool(torch.equal(a, b))
            worst = max(worst, (a.float() - b.float()).abs().max().item())
        out[config] = {"bit_equal": f"{equal}/{len(keys)}", "max_abs_diff": worst, "missing": missing}
    first = agg[keys[0]]
    out["dtype"] = str(first.dtype) if first is not None else None
    return out


def main() -> None:
    if sys.argv[1] == "--one":  # a child: one engine, one configuration
        encode_all(sys.argv[2], sys.argv[3], sys.argv[4])
        return
    model, outfile = sys.argv[1], sys.argv[2]
    label = sys.argv[3] if len(sys.argv) > 3 else "mm-embed"
    with tempfile.TemporaryDirectory(prefix="mm-embed-") as tmp:
        folders = {c: os.path.join(tmp, c) for c in CONFIGS}
        for config, folder in folders.items():
            os.makedirs(folder)
            subprocess.run([sys.executable, __file__, "--one", model, config, folder], check=True)
        row = {"label": label, "extra_args": os.environ.get("EXTRA_ARGS", ""), **compare(folders)}
    print(json.dumps(row), flush=True)
    with open(outfile, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
