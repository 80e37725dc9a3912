"""vLLM's own offline output for given prompts, in a child process: the reference for equality.

Usage: python tests/offline_reference.py MODEL REQUESTS_JSON -> prints a JSON list of texts.
Each request is {"kind": "chat"|"completion", "input": messages|prompt, "params": {...}}.
"""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    model, requests = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=model, enforce_eager=True, kv_cache_memory_bytes=128 << 20, block_size=32)
    out = []
    for r in requests:
        params = SamplingParams(**r["params"])
        if r["kind"] == "chat":
            res = llm.chat(r["input"], params, use_tqdm=False)
        else:
            res = llm.generate(r["input"], params, use_tqdm=False)
        out.append([o.text for o in res[0].outputs])
    llm.llm_engine.engine_core.shutdown()
    print("REFERENCE " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
