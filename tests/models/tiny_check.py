"""Child process: greedy outputs of the tiny model in real vLLM, with and without its LoRA adapter."""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    model = sys.argv[1]
    llm = LLM(
        model=model,
        enforce_eager=True,
        kv_cache_memory_bytes=128 << 20,
        block_size=32,
        enable_lora=True,
        max_loras=1,
        max_lora_rank=8,
    )
    params = SamplingParams(max_tokens=16, temperature=0)
    prompts = ["the cat sees a dog", "blue river and old city"]
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    second = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    lora = [
        o.outputs[0].token_ids
        for o in llm.generate(
            prompts, params, use_tqdm=False, lora_request=LoRARequest("tiny", 1, model + "/lora")
        )
    ]
    llm.llm_engine.engine_core.shutdown()
    print(
        "RESULT "
        + json.dumps(
            {
                "first": [list(x) for x in first],
                "second": [list(x) for x in second],
                "lora": [list(x) for x in lora],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
