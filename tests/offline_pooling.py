"""vLLM's own offline pooling outputs, in a child process: the reference for equality.
Usage: python tests/offline_pooling.py MODEL REQUESTS_JSON -> a JSON list, one answer a request:
a token-id list gets its embedding (`LLM.embed`), {"score": [data_1, data_2]} gets the scores
`LLM.score(data_1, data_2)` gives (cosine similarity for an embedding model),
{"classify": [CLASSIFIER, texts]} gets each text's class probabilities from `LLM.classify` on
that sequence-classification model, and {"cross_score": [CLASSIFIER, data_1, data_2]} the scores
`LLM.score` gives with it (a one-label classifier: a cross-encoder), with a score template when
the list goes on with [TEMPLATE, CHAT_TEMPLATE_KWARGS]. Each classifier's engine starts once,
after MODEL's has stopped.
"""

import json
import sys


def _llm(model: str, **kw):
    from vllm import LLM

    return LLM(
        model=model, runner="pooling", enforce_eager=True, kv_cache_memory_bytes=64 << 20, block_size=32, **kw
    )


def main() -> None:
    from vllm import PoolingParams
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
    by_classifier: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
        if isinstance(req, dict) and ("classify" in req or "cross_score" in req):
            by_classifier.setdefault((req.get("classify") or req["cross_score"])[0], []).append(i)
    for classifier, indices in by_classifier.items():
        llm = _llm(classifier)  # vLLM picks the classify task for *ForSequenceClassification
        for i in indices:
            req = requests[i]
            if "classify" in req:
                out = llm.classify(req["classify"][1], use_tqdm=False)
                answers[i] = [list(map(float, o.outputs.probs)) for o in out]
            else:
                _, data_1, data_2, *template = req["cross_score"]
                kw = {}
                if template:
                    extra = {"chat_template_kwargs": template[1]}
                    kw = {"chat_template": template[0], "pooling_params": PoolingParams(extra_kwargs=extra)}
                out = llm.score(data_1, data_2, use_tqdm=False, **kw)
                answers[i] = [float(o.outputs.score) for o in out]
        llm.llm_engine.engine_core.shutdown()
    print("REFERENCE " + json.dumps(answers), flush=True)


if __name__ == "__main__":
    main()
