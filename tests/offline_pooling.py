"""vLLM's own offline embeddings for given token-id prompts, in a child process: the reference
for equality. Usage: python tests/offline_pooling.py MODEL PROMPTS_JSON -> a JSON list of vectors.
"""

import json
import sys


def main() -> None:
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    model, prompts = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(
        model=model,
        runner="pooling",
        convert="embed",
        enforce_eager=True,
        kv_cache_memory_bytes=64 << 20,
        block_size=32,
    )
    out = llm.embed([TokensPrompt(prompt_token_ids=p) for p in prompts], use_tqdm=False)
    vectors = [list(map(float, o.outputs.embedding)) for o in out]
    llm.llm_engine.engine_core.shutdown()
    print("REFERENCE " + json.dumps(vectors), flush=True)


if __name__ == "__main__":
    main()
