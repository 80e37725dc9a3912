#!/usr/bin/env bash
# profile_agg.sh [CONCURRENCY] -- device side, after assemble.sh (with py-spy among the extra
# wheels) + env.sh and /tmp/m built. Starts `dynvllm serve agg` like bench_one.sh, warms it up,
# then samples the frontend and the worker with py-spy (collapsed stacks, CPU only) for 20 s
# while loadgen.py runs ISL 1000 / OSL 200 at the given concurrency. Files land in $OUT.
set -uo pipefail
C=${1:-16}; HERE=$(cd "$(dirname "$0")" && pwd); M=/tmp/m; P=8300
export PATH=/tmp/site/bin:$PATH
setsid python3 -m dynvllm serve agg --model $M --served-model-name m --http-host 127.0.0.1 --http-port $P \
  --max-model-len 4096 --gpu-memory-utilization 0.80 > /tmp/srv_prof.log 2>&1 &
PID=$!
for i in $(seq 1 300); do curl -sf http://127.0.0.1:$P/v1/models | grep -q '"m"' && break; sleep 1; done
FE=$(pgrep -f "dynvllm.child frontend" | head -1); WK=$(pgrep -f "dynvllm.child worker" | head -1)
LG=(python3 $HERE/loadgen.py --url http://127.0.0.1:$P --model m --tokenizer $M --input-tokens 1000
    --output-tokens 200 --ignore-eos --label prof --out ${OUT:-/tmp}/prof.jsonl --timeout 300)
"${LG[@]}" --concurrency $C --requests 64
py-spy record -p "$WK" -d 20 -r 200 -f raw -o ${OUT:-/tmp}/worker.txt --nonblocking > /tmp/spy_w.log 2>&1 &
SW=$!
py-spy record -p "$FE" -d 20 -r 200 -f raw -o ${OUT:-/tmp}/frontend.txt --nonblocking > /tmp/spy_f.log 2>&1 &
SF=$!
"${LG[@]}" --concurrency $C --requests 512
wait $SW $SF  # not a bare wait: the server is a background job of this shell too
tail -2 /tmp/spy_w.log /tmp/spy_f.log
kill -INT -- -$PID 2>/dev/null; for i in $(seq 1 30); do kill -0 $PID 2>/dev/null || break; sleep 1; done
kill -KILL -- -$PID 2>/dev/null; true
