"""vLLM's own offline pooling outputs, in a child process: the reference for equality.
Usage: python tests/offline_pooling.py MODEL REQUESTS_JSON -> a JSON list, one answer a request:
a token-id list gets its embedding (`LLM.embed`), {"score": [data_1, data_2]} gets the scores
`LLM.score(data_1, data_2)` gives (cosine similarity for an embedding model), and
{"classify": [CLASSIFIER, texts]} gets each text's class probabilities from `LLM.classify` on
that sequence-classification model (its engine starts once MODEL's has stopped).
"""

import json
import sys


def _llm(model: str, **kw):
    from vllm import LLM

    return LLM(
        model=model, runner="pooling", enforce_eager=True, kv_cache_memory_bytes=64 << 20, block_size=32, **kw
    )


def main() -> None:
    from vllm.inputs import TokensPrompt

    model, requests = sys.argv[1], json.loads(sys.argv[2])
    answers: list = [None] * len(requests)
    llm = _llm(model, convert="embed")
    for i, req in enumerate(requests):
        if isinstance(req, dict) and "score" in req:
            out = llm.score(*req["score"], use_tqdm=False)
            answers[i] = [float(o.outputs.score) for o in out]
        elif not isinstance(req, dict):
            (o,) = llm.embed([TokensPrompt(prompt_token_ids=req)], use_tqdm=False)
            answers[i] = list(map(float, o.outputs.embedding))
    llm.llm_engine.engine_core.shutdown()
    for i, req in enumerate(requests):
        if isinstance(req, dict) and "classify" in req:
            classifier, texts = req["classify"]
            llm = _llm(classifier)  # vLLM picks the classify task for *ForSequenceClassification
            answers[i] = [list(map(float, o.outputs.probs)) for o in llm.classify(texts, use_tqdm=False)]
            llm.llm_engine.engine_core.shutdown()
    print("REFERENCE " + json.dumps(answers), flush=True)


if __name__ == "__main__":
    main()
