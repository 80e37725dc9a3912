#!/usr/bin/env bash
# bench_one.sh vllm|dynvllm LABEL -- device side, after assemble.sh + env.sh and /tmp/m built.
# Starts one server on 127.0.0.1:8300 with the same engine arguments, runs scripts/gpu/loadgen.py
# (loadgen.py beside this script; ISL $ISL / OSL $OSL, default 1000 / 200, streaming chat, ignore_eos) at c=1
# ($N1 requests, default 24) and c=$LEVELS (default 16,64,256; $REQS each, default 256), each level on
# prompts of its own, then stops it. The engine's latency histograms (vLLM's /metrics; dynvllm's
# worker metrics port) and dynvllm's frontend's are scraped around each level: their means split
# the client's TTFT into engine and path. JSON lines go to $OUT/gpu_bench.jsonl. N1=0 skips c=1.
# VLLM_EVENTS=1 (vllm only): the engine publishes KV events, as under dynvllm.
# SPY_S=N: py-spy records each server process (API/frontend, worker, engine core) for N s from
# SPY_AFTER s (default 6) into the first level, as collapsed stacks in $SPY_DIR (default /tmp/spy).
set -uo pipefail
W=$1; LABEL=$2; HERE=$(cd "$(dirname "$0")" && pwd); LOADGEN=${LOADGEN:-$HERE/loadgen.py}; M=${M:-/tmp/m}; P=8300
ENG=(--max-model-len 4096 --gpu-memory-utilization 0.80 ${EXTRA:-})
export PATH=/tmp/site/bin:$PATH
if [ "$W" = vllm ]; then
  # VLLM_EVENTS=1: vLLM's server publishes KV events as dynvllm's workers have it do (ZMQ, with a
  # replay socket), so the engine core does the same work per step and the rest of the gap shows.
  EV=(); [ "${VLLM_EVENTS:-0}" = 1 ] && EV=(--kv-events-config \
    '{"enable_kv_cache_events": true, "publisher": "zmq", "topic": "kv", "endpoint": "tcp://*:8390", "replay_endpoint": "tcp://*:8391"}')
  setsid python3 -m vllm.entrypoints.openai.api_server --model $M --served-model-name m --host 127.0.0.1 --port $P \
    --disable-uvicorn-access-log "${EV[@]}" "${ENG[@]}" > /tmp/srv_$LABEL.log 2>&1 &
else
  setsid python3 -m dynvllm serve agg --model $M --served-model-name m --http-host 127.0.0.1 --http-port $P \
    --metrics-port $((P + 1)) "${ENG[@]}" > /tmp/srv_$LABEL.log 2>&1 &
fi
PID=$!; t0=$(date +%s); ok=0
trap 'kill -KILL -- -$PID 2>/dev/null' EXIT; trap 'exit 143' TERM INT  # no server left behind by `timeout`
for i in $(seq 1 300); do
  curl -sf http://127.0.0.1:$P/v1/models | grep -q '"m"' && { ok=1; break; }
  kill -0 $PID 2>/dev/null || break; sleep 1
done
echo "[$LABEL] ready=$ok after $(( $(date +%s)-t0 )) s"
if [ $ok = 1 ]; then
  LG=(python3 $LOADGEN --url http://127.0.0.1:$P --model m --tokenizer $M --input-tokens ${ISL:-1000}
      --output-tokens ${OSL:-200} --ignore-eos --label "$LABEL" --out ${OUT:-/tmp}/gpu_bench.jsonl --timeout 300)
  if [ "$W" = vllm ]; then CP=(--cpu-pid api=$PID --metrics engine=http://127.0.0.1:$P/metrics); else
    CP=(--cpu-pid frontend=$(pgrep -f "dynvllm.child frontend" | head -1) --cpu-pid worker=$(pgrep -f "dynvllm.child worker" | head -1)
        --metrics engine=http://127.0.0.1:$((P + 1))/metrics --metrics frontend=http://127.0.0.1:$P/metrics); fi
  LG+=("${CP[@]}")
  [ "${N1:-24}" != 0 ] && "${LG[@]}" --concurrency 1 --requests ${N1:-24} --warmup 2 --seed 1
  if [ -n "${SPY_S:-}" ]; then  # py-spy samples each process of the server during the first level
    mkdir -p ${SPY_DIR:-/tmp/spy}; ENGINE=$(pgrep -f EngineCore | head -1)
    if [ "$W" = vllm ]; then SP="api=$PID core=$ENGINE"; else
      SP="frontend=$(pgrep -f "dynvllm.child frontend" | head -1) worker=$(pgrep -f "dynvllm.child worker" | head -1) core=$ENGINE"; fi
    for np in $SP; do (sleep ${SPY_AFTER:-6}; py-spy record --nonblocking -r 200 -d $SPY_S -f raw \
      -o ${SPY_DIR:-/tmp/spy}/${LABEL}_${np%%=*}.txt -p ${np#*=} > /dev/null 2>&1) & done
  fi
  "${LG[@]}" --concurrency ${LEVELS:-16,64,256} --requests ${REQS:-256}
fi
kill -INT -- -$PID 2>/dev/null; for i in $(seq 1 30); do kill -0 $PID 2>/dev/null || break; sleep 1; done
kill -KILL -- -$PID 2>/dev/null
grep -E "Traceback|Error|error" /tmp/srv_$LABEL.log | grep -v -i "warning" | head -8
cp /tmp/srv_$LABEL.log ${OUT:-/tmp}/ 2>/dev/null; true
