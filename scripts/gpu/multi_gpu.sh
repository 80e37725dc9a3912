#!/usr/bin/env bash
# multi_gpu.sh -- device side on a 2-GPU host, after assemble.sh + env.sh and /tmp/m built:
# the same shared-prefix probe (dp_probe.py) against
#   dp2:  one worker with --data-parallel-size 2 (a rank per GPU), KV router over ranks
#   two:  two independent workers, one per GPU (CUDA_VISIBLE_DEVICES), KV router over workers
#   tp1 / tp2: one worker with --tensor-parallel-size 1 / 2 (greedy texts compared)
# Results: one line per case on stdout and JSON lines in $OUT/multi_gpu.jsonl.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); M=/tmp/m; P=8300; OUT=${OUT:-/tmp}; CASES=${CASES:-"dp2 two tp1 tp2"}
ENG=(--max-model-len 4096 --gpu-memory-utilization 0.80 ${EXTRA:-})
export PATH=/tmp/site/bin:$PATH
ready() { for i in $(seq 1 300); do curl -sf http://127.0.0.1:$P/health | grep -q "\"workers\":$1" && return 0; sleep 1; done; return 1; }
base=(python3 -m dynvllm serve agg --model $M --served-model-name m --http-host 127.0.0.1 --http-port $P --router kv)
for c in $CASES; do
  t0=$(date +%s); pids=()
  case $c in
    dp2) setsid "${base[@]}" --namespace $c --data-parallel-size 2 "${ENG[@]}" > /tmp/mg_$c.log 2>&1 & pids+=($!); n=1 ;;
    two) CUDA_VISIBLE_DEVICES=0 setsid "${base[@]}" --namespace $c "${ENG[@]}" > /tmp/mg_$c.log 2>&1 & pids+=($!)
         # the second worker finds the service's NATS through the namespace `serve` recorded
         for i in $(seq 60); do python3 -m dynvllm status --namespace $c --json >/dev/null 2>&1 && break; sleep 1; done
         CUDA_VISIBLE_DEVICES=1 setsid python3 -m dynvllm serve agg --no-frontend --model $M --served-model-name m \
           --namespace $c "${ENG[@]}" > /tmp/mg_${c}_b.log 2>&1 & pids+=($!); n=2 ;;
    tp1) CUDA_VISIBLE_DEVICES=0 setsid "${base[@]}" --namespace $c "${ENG[@]}" > /tmp/mg_$c.log 2>&1 & pids+=($!); n=1 ;;
    tp2) setsid "${base[@]}" --namespace $c --tensor-parallel-size 2 "${ENG[@]}" > /tmp/mg_$c.log 2>&1 & pids+=($!); n=1 ;;
  esac
  if ready $n; then echo "[$c] ready after $(( $(date +%s)-t0 )) s"; python3 $HERE/dp_probe.py http://127.0.0.1:$P $c $OUT/multi_gpu.jsonl
  else echo "[$c] not ready"; tail -5 /tmp/mg_$c.log; fi
  for p in "${pids[@]}"; do kill -INT -- -$p 2>/dev/null; done
  for p in "${pids[@]}"; do for i in $(seq 30); do kill -0 $p 2>/dev/null || break; sleep 1; done; kill -KILL -- -$p 2>/dev/null; done
  cp /tmp/mg_$c*.log $OUT/ 2>/dev/null
done
