#!/usr/bin/env bash
# pressure.sh -- device side on a one-GPU host, after assemble.sh + env.sh and /tmp/m built.
# KV routing under cache pressure: pressure_probe.py's multi-turn trace (64 system prompts of ~2,000
# tokens x 3 conversations x 2 turns, c=16) is larger than one engine's KV cache ($KV_TOKENS tokens,
# default 48,000, through --kv-cache-memory-bytes) and smaller than four.
#   ceiling: one engine with four times the KV budget: the cached-share ceiling
#   four:    four engines on the GPU behind three frontends on one NATS: kv (port P), round-robin (P+1),
#            least-loaded (P+2; THIRD=kv4: kv with weight 4 and no decode weight instead; THIRD=alt: kv
#            with the flags of $ALT, e.g. ALT="--router-decode-weight 0"; KV_ARGS: more flags for
#            the kv frontend on P, e.g. KV_ARGS="--router-prefill-weight 4"; alt2 in $POLS: a fourth
#            frontend on P+3, kv with the flags of $ALT2); each policy of $POLS (default "kv rr ll")
#            runs the trace $ROUNDS times (default 2), each run with prompts of its own (SALT), so
#            no run finds another's blocks
#   tier:    the four engines again with vLLM's native CPU offloading (--kv-offloading-size $TIER_GIB
#            each, default 8): kv and round-robin
# UTIL: each of the four engines' --gpu-memory-utilization (default 0.12). With
# --kv-cache-memory-bytes vLLM sizes the KV cache from that alone, so 0.12 runs on an H100 too.
# kv on P runs the router's defaults (weight 8, decode weight 0.5 since 2026-12-06) plus $KV_ARGS.
# four and tier also count the KV events relayed to the routers by medium (kv_tier_probe.py).
# Results: one line per run on stdout, JSON lines in $OUT/pressure.jsonl.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); M=${M:-/tmp/m}; P=8300; OUT=${OUT:-/tmp}; CASES=${CASES:-"ceiling four"}
KV_TOKENS=${KV_TOKENS:-48000}
# mkmodel.py's tokenizer makes ~3.2 tokens of a pressure_probe word: 620 words are ~2,000 tokens.
PROBE_ARGS=${PROBE_ARGS:-"64 3 620 16"}
# Bytes a token's KV takes in the model's shape (Qwen3-0.6B: 28 layers x 8 KV heads x 128 x (K, V) x
# 2 bytes = 114,688; mkmodel.py's 4b shape: 36 layers, 147,456).
KV_TOKEN_BYTES=$(python3 -c "import json; c = json.load(open('$M/config.json'))
print(c['num_hidden_layers'] * c['num_key_value_heads'] * (c.get('head_dim') or c['hidden_size'] // c['num_attention_heads']) * 4)")
KV=$((KV_TOKENS * KV_TOKEN_BYTES))
THIRD=${THIRD:-ll}
ENG=(--max-model-len 8192 ${EXTRA:-})
export PATH=/tmp/site/bin:$PATH
NATS=nats://127.0.0.1:4322
ALL=()
stop() { for p in "$@"; do kill -INT -- -$p 2>/dev/null; done
  for p in "$@"; do for i in $(seq 30); do kill -0 $p 2>/dev/null || break; sleep 1; done; kill -KILL -- -$p 2>/dev/null; done; }
trap 'stop "${ALL[@]}"' EXIT; trap 'exit 143' TERM INT
ready() {  # ready PORT WORKERS PID
  for i in $(seq 1 ${READY_S:-300}); do curl -sf http://127.0.0.1:$1/health | grep -q "\"workers\":$2" && return 0
    kill -0 $3 2>/dev/null || return 1; sleep 1; done; return 1; }
setsid nats-server -a 127.0.0.1 -p 4322 -js -sd /tmp/pressure-js > /tmp/pr_nats.log 2>&1 & ALL+=($!)
salt=0
probe() {  # probe PORT LABEL
  salt=$((salt + 1)); python3 -m dynvllm kv clear --nats-url $NATS --namespace $NS > /dev/null 2>&1
  SALT=$salt timeout 300 python3 $HERE/pressure_probe.py http://127.0.0.1:$1 "$2" $OUT/pressure.jsonl $PROBE_ARGS
}
for c in $CASES; do
  t0=$(date +%s); NS=$c
  case $c in
    ceiling)
      setsid python3 -m dynvllm serve agg --model $M --served-model-name m --nats-url $NATS --namespace $NS \
        --http-host 127.0.0.1 --http-port $P --router kv --gpu-memory-utilization 0.30 \
        --kv-cache-memory-bytes $((4 * KV)) "${ENG[@]}" > /tmp/pr_$c.log 2>&1 & s=$!; ALL+=($s)
      if ready $P 1 $s; then echo "[$c] ready after $(( $(date +%s)-t0 )) s"
        for r in 1 2; do probe $P ceiling-$r; done
      else echo "[$c] not ready"; tail -20 /tmp/pr_$c.log; fi
      stop $s ;;
    four|tier)
      extra=(); pols=${POLS:-"kv rr $THIRD"}
      [ $c = tier ] && { extra=(--kv-offloading-size ${TIER_GIB:-8}); pols=${POLS:-"kv rr"}; }
      setsid python3 -m dynvllm serve agg --model $M --served-model-name m --nats-url $NATS --namespace $NS \
        --http-host 127.0.0.1 --http-port $P --router kv ${KV_ARGS:-} --workers 4 --gpu-memory-utilization ${UTIL:-0.12} \
        --kv-cache-memory-bytes $KV "${extra[@]}" "${ENG[@]}" > /tmp/pr_$c.log 2>&1 & s=$!; ALL+=($s)
      fr=()
      case $THIRD in kv4) third="kv $((P + 2)) --router-prefill-weight 4 --router-decode-weight 0" ;; alt) third="kv $((P + 2)) ${ALT:-}" ;;
        *) third="least-loaded $((P + 2))" ;; esac
      prs=("round-robin $((P + 1))" "$third")
      case " $pols " in *" alt2 "*) prs+=("kv $((P + 3)) ${ALT2:-}") ;; esac
      for pr in "${prs[@]}"; do set -- $pr
        setsid python3 -m dynvllm frontend --nats-url $NATS --namespace $NS --router $1 --http-host 127.0.0.1 \
          --http-port $2 "${@:3}" > /tmp/pr_${c}_$1_$2.log 2>&1 & fr+=($!); ALL+=($!)
      done
      if ready $P 4 $s && ready $((P + 1)) 4 ${fr[0]} && ready $((P + 2)) 4 ${fr[1]} \
        && { [ ${#fr[@]} -lt 3 ] || ready $((P + 3)) 4 ${fr[2]}; }; then
        echo "[$c] ready after $(( $(date +%s)-t0 )) s"
        python3 $HERE/kv_tier_probe.py $NATS $NS $OUT/pressure.jsonl & sniff=$!  # events by medium
        for r in $(seq ${ROUNDS:-2}); do for pol in $pols; do
          case $pol in kv) port=$P ;; rr) port=$((P + 1)) ;; ll|kv4|alt) port=$((P + 2)) ;; alt2) port=$((P + 3)) ;; esac
          probe $port $c-$pol-$r
        done; done
        kill -TERM $sniff; wait $sniff
      else echo "[$c] not ready"; tail -20 /tmp/pr_$c.log; fi
      stop "${fr[@]}" $s ;;
  esac
  cp /tmp/pr_$c*.log $OUT/ 2>/dev/null
done
