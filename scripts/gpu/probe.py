"""probe.py MODEL_DIR [graph|eager] -- offline vLLM probe: load, 64 prompts x 128 tokens (ignore_eos), tok/s."""

import json
import sys
import time

t0 = time.time()
import vllm
from vllm import LLM, SamplingParams

print(f"vllm {vllm.__version__} imported in {time.time() - t0:.1f}s", flush=True)
model = sys.argv[1]
mode = sys.argv[2] if len(sys.argv) > 2 else "graph"
t0 = time.time()
llm = LLM(model, enforce_eager=(mode == "eager"), max_model_len=2048, gpu_memory_utilization=0.85, seed=0)
load_s = time.time() - t0
print(f"LLM ready ({mode}) in {load_s:.1f}s", flush=True)
print(
    "chat:",
    repr(
        llm.chat([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=8, temperature=0))[0]
        .outputs[0]
        .text
    ),
    flush=True,
)
res = {"mode": mode, "load_s": round(load_s, 1)}
for n, L in ((64, 128), (256, 128)):
    prompts = [f"prompt {i}: the quick brown fox jumps over the lazy dog" for i in range(n)]
    sp = SamplingParams(max_tokens=L, ignore_eos=True, temperature=0.8, top_p=0.95, seed=1)
    warm = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.8, top_p=0.95, seed=1)
    llm.generate(prompts, warm, use_tqdm=False)  # warm: same batch + sampling kernels (Triton JIT)
    t = time.time()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.time() - t
    ntok = sum(len(o.outputs[0].token_ids) for o in outs)
    res[f"{n}x{L}"] = {"out_tokens": ntok, "s": round(dt, 3), "tok_per_s": round(ntok / dt, 1)}
    print(f"{n} prompts x {L}: {ntok} tokens in {dt:.2f}s = {ntok / dt:.0f} tok/s", flush=True)
print("RESULT", json.dumps(res), flush=True)
