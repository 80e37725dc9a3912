#!/usr/bin/env bash
# ttft_split_cpu.sh [ROUNDS] -- on this CPU machine, vLLM's OpenAI server and `dynvllm serve agg`
# side by side (alternating, same tiny model and engine arguments), ISL 1000 / OSL 64 streaming
# chat at c=1 and c=16 (32 requests each). scripts/gpu/loadgen.py scrapes each server's engine
# latency histograms (and dynvllm's frontend's) around each level, so the client's TTFT splits into
# engine, frontend and the rest. JSON lines: $OUT/ttft_split.jsonl (OUT default /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python; M=${M:-/tmp/ttft-split-model}; OUT=${OUT:-/tmp}; P=${PORT:-8400}; MP=$((P + 1))
[ -f "$M/config.json" ] || $PY -m dynvllm model tiny "$M" > /dev/null
ENG=(--enforce-eager --kv-cache-memory-bytes 1000000000)
for round in $(seq "${1:-2}"); do
  for w in vllm dyn; do
    if [ $w = vllm ]; then
      setsid $PY -m vllm.entrypoints.openai.api_server --model "$M" --served-model-name m --host 127.0.0.1 \
        --port $P --disable-uvicorn-access-log "${ENG[@]}" > "$OUT/ttft_split_$w.log" 2>&1 &
      MET=(--metrics engine=http://127.0.0.1:$P/metrics)
    else
      setsid $PY -m dynvllm serve agg --model "$M" --served-model-name m --http-host 127.0.0.1 --http-port $P \
        --metrics-port $MP "${ENG[@]}" --namespace split$round > "$OUT/ttft_split_$w.log" 2>&1 &
      MET=(--metrics engine=http://127.0.0.1:$MP/metrics --metrics frontend=http://127.0.0.1:$P/metrics)
    fi
    PID=$!
    for i in $(seq 300); do curl -sf http://127.0.0.1:$P/v1/models | grep -q '"m"' && break; sleep 1; done
    $PY scripts/gpu/loadgen.py --url http://127.0.0.1:$P --model m --tokenizer "$M" --input-tokens 1000 \
      --output-tokens 64 --ignore-eos --concurrency 1,16 --requests 32 --warmup 2 "${MET[@]}" \
      --label $w-$round --out "$OUT/ttft_split.jsonl" | cut -c1-160
    kill -INT -- -$PID; for i in $(seq 20); do kill -0 $PID 2>/dev/null || break; sleep 1; done
    kill -KILL -- -$PID 2>/dev/null
  done
done
