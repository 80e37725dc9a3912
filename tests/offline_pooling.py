"""vLLM's own offline pooling outputs, in a child process: the reference for equality.
Usage: python tests/offline_pooling.py MODEL REQUESTS_JSON -> a JSON list, one answer a request:
a token-id list gets its embedding (`LLM.embed`), {"score": [data_1, data_2]} gets the scores
`LLM.score(data_1, data_2)` gives (cosine similarity for an embedding model).
"""

import json
import sys


def main() -> None:
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    model, requests = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(
        model=model,
        runner="pooling",
        convert="embed",
        enforce_eager=True,
        kv_cache_memory_bytes=64 << 20,
        block_size=32,
    )
    answers: list = []
    for req in requests:
        if isinstance(req, dict):
            out = llm.score(*req["score"], use_tqdm=False)
            answers.append([float(o.outputs.score) for o in out])
        else:
            (o,) = llm.embed([TokensPrompt(prompt_token_ids=req)], use_tqdm=False)
            answers.append(list(map(float, o.outputs.embedding)))
    llm.llm_engine.engine_core.shutdown()
    print("REFERENCE " + json.dumps(answers), flush=True)


if __name__ == "__main__":
    main()
