"""vLLM's own offline output for given prompts, in a child process: the reference for equality.

Usage: python tests/offline_reference.py MODEL REQUESTS_JSON [LLM_KWARGS_JSON] -> a JSON list of texts.
Each request is {"kind": "chat"|"completion", "input": messages|prompt, "params": {...}}; a
"structured_outputs" param becomes vLLM's StructuredOutputsParams; "lora": FOLDER applies an
adapter (a relative FOLDER is inside MODEL); "image": FILE sends a completion's prompt with that
image. With "prompt_logprobs" the entry is {"texts": [...], "prompt_logprobs": [logprob of each
prompt token or None], "prompt_token_ids": [...]}; with "token_ids": true it is {"texts": [...],
"token_ids": [[generated ids of each output], ...]}.
"""

import json
import os
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    model, requests = sys.argv[1], json.loads(sys.argv[2])
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}  # more LLM() arguments
    llm = LLM(model=model, enforce_eager=True, kv_cache_memory_bytes=128 << 20, block_size=32, **extra)
    out = []
    lora_ids: dict[str, int] = {}
    for r in requests:
        kwargs = dict(r["params"])
        if "structured_outputs" in kwargs:
            kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
        params = SamplingParams(**kwargs)
        lora = None
        if r.get("lora"):  # an adapter folder; the LLM needs enable_lora in LLM_KWARGS_JSON
            from vllm.lora.request import LoRARequest

            path = os.path.join(model, r["lora"])
            n = lora_ids.setdefault(path, len(lora_ids) + 1)  # vLLM knows an adapter by its id
            lora = LoRARequest(f"adapter{n}", n, path)
        if r["kind"] == "chat":
            res = llm.chat(r["input"], params, use_tqdm=False, lora_request=lora)
        elif r.get("image"):
            from PIL import Image

            prompt = {
                "prompt": r["input"],
                "multi_modal_data": {"image": Image.open(r["image"]).convert("RGB")},
            }
            res = llm.generate(prompt, params, use_tqdm=False)
        else:
            res = llm.generate(r["input"], params, use_tqdm=False, lora_request=lora)
        texts = [o.text for o in res[0].outputs]
        if kwargs.get("prompt_logprobs") is not None:
            ids = res[0].prompt_token_ids
            lps = [
                None if e is None else e[t].logprob for t, e in zip(ids, res[0].prompt_logprobs, strict=True)
            ]
            out.append({"texts": texts, "prompt_logprobs": lps, "prompt_token_ids": ids})
        elif r.get("token_ids"):
            out.append({"texts": texts, "token_ids": [list(o.token_ids) for o in res[0].outputs]})
        else:
            out.append(texts)
    llm.llm_engine.engine_core.shutdown()
    print("REFERENCE " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
