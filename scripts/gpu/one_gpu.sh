#!/usr/bin/env bash
# one_gpu.sh -- device side on a one-GPU host, after assemble.sh + env.sh and /tmp/m built:
#   one:  one worker (--gpu-memory-utilization 0.80): the hit-rate ceiling, one cache that sees all
#   kv:   two workers sharing the GPU (0.40 each; the second joins once the first is up), KV router
#   rr:   the same two workers, round-robin
#         each probed by dp_probe.py (8 system prompts x 8 questions, c=16, then again)
#   lora: one worker with --enable-lora; a random rank-8 adapter (mkmodel.py lora) loaded at run
#         time with `dynvllm lora load`; greedy base vs adapter texts, /v1/models, loadgen on both
#   mm:   the tiny BLIP-2 (`dynvllm model tiny --vision`) and a random Qwen2.5-VL (mkmodel_vl.py)
#         each through agg, then through an encode worker (--roles agg=1,encode=1): mm_probe.py
#         ($MM_N image chats, default 256, c=16, 8 distinct images repeated; two rounds): greedy
#         texts per image equal, images/s encode vs agg
#   embed: `dynvllm serve embed` vs vLLM's server with --runner pooling --convert embed on $M:
#         embed_bench.py on each (the same probe vectors within 1e-3; embeddings/s at c=16 on
#         $EMBED_N inputs of ~200 tokens, default 512, two rounds)
# A server that exits while starting ends its wait at once; $READY_S bounds the wait (default 300).
# Results: one line per case on stdout, JSON lines in $OUT/one_gpu.jsonl.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); M=${M:-/tmp/m}; P=8300; OUT=${OUT:-/tmp}; CASES=${CASES:-"one kv rr lora mm"}
ENG=(--max-model-len 4096 ${EXTRA:-})
export PATH=/tmp/site/bin:$PATH
ready() {  # ready WORKERS [PID]
  for i in $(seq 1 ${READY_S:-300}); do curl -sf http://127.0.0.1:$P/health | grep -q "\"workers\":$1" && return 0
    [ -n "${2:-}" ] && ! kill -0 $2 2>/dev/null && return 1; sleep 1; done; return 1; }
serve=(python3 -m dynvllm serve agg --model $M --served-model-name m --http-host 127.0.0.1 --http-port $P)
stop() { for p in "$@"; do kill -INT -- -$p 2>/dev/null; done
  for p in "$@"; do for i in $(seq 30); do kill -0 $p 2>/dev/null || break; sleep 1; done; kill -KILL -- -$p 2>/dev/null; done; }
ALL=(); trap 'stop "${ALL[@]}"' EXIT; trap 'exit 143' TERM INT  # servers stop also when `timeout` ends this
chat() {  # chat MODEL TEXT -> greedy text of 48 tokens
  curl -s http://127.0.0.1:$P/v1/chat/completions -H 'content-type: application/json' -d "{\"model\": \"$1\",
    \"messages\": [{\"role\": \"user\", \"content\": \"$2\"}], \"max_tokens\": 48, \"temperature\": 0}" |
    python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["choices"][0]["message"]["content"]))'
}
for c in $CASES; do
  t0=$(date +%s); pids=()
  case $c in
    one) setsid "${serve[@]}" --namespace $c --router kv --gpu-memory-utilization 0.80 "${ENG[@]}" > /tmp/og_$c.log 2>&1 & pids+=($!); ALL+=($!); n=1 ;;
    kv|rr) r=kv; [ $c = rr ] && r=round-robin
      setsid "${serve[@]}" --namespace $c --router $r --gpu-memory-utilization 0.40 "${ENG[@]}" > /tmp/og_$c.log 2>&1 & pids+=($!); ALL+=($!)
      ready 1 || { echo "[$c] first worker not ready"; tail -5 /tmp/og_$c.log; }
      setsid python3 -m dynvllm serve agg --no-frontend --model $M --served-model-name m --namespace $c \
        --gpu-memory-utilization 0.40 "${ENG[@]}" > /tmp/og_${c}_b.log 2>&1 & pids+=($!); ALL+=($!); n=2 ;;
    lora) python3 $HERE/mkmodel.py lora $M /tmp/adapter > /dev/null
      setsid "${serve[@]}" --namespace $c --gpu-memory-utilization 0.80 --enable-lora --max-lora-rank 8 \
        --lora-roots /tmp "${ENG[@]}" > /tmp/og_$c.log 2>&1 & pids+=($!); ALL+=($!); n=1 ;;
    mm) python3 -m dynvllm model tiny --vision /tmp/vis > /dev/null
      python3 $HERE/mkmodel_vl.py /tmp/qvl > /tmp/og_mkvl.log 2>&1 || tail -5 /tmp/og_mkvl.log
      ;;
  esac
  if [ $c = mm ]; then
    for mm in ${MM_MODELS:-vis qvl}; do
      for topo in ${TOPOS:-agg encode}; do
        extra=(); [ $topo = encode ] && extra=(--roles agg=1,encode=1)
        setsid python3 -m dynvllm serve agg --model /tmp/$mm --served-model-name m --http-host 127.0.0.1 --http-port $P \
          --namespace mm$mm$topo --gpu-memory-utilization 0.30 "${extra[@]}" > /tmp/og_mm_${mm}_$topo.log 2>&1 & p=$!; ALL+=($p)
        want=1; [ $topo = encode ] && want=2
        if ready $want $p; then
          echo "[mm-$mm-$topo] ready after $(( $(date +%s)-t0 )) s"
          for r in 1 2; do timeout 200 python3 $HERE/mm_probe.py http://127.0.0.1:$P m mm-$mm-$topo-$r $OUT/one_gpu.jsonl \
            ${MM_N:-256} 16 8 112 | cut -c1-600; done
          # One image at a time: texts without batch neighbours (bf16 GEMMs round by batch shape).
          timeout 100 python3 $HERE/mm_probe.py http://127.0.0.1:$P m mm-$mm-$topo-c1 $OUT/one_gpu.jsonl 8 1 8 112 | cut -c1-300
        else echo "[mm-$mm-$topo] not ready"; tail -8 /tmp/og_mm_${mm}_$topo.log; fi
        stop $p; t0=$(date +%s); cp /tmp/og_mm_${mm}_$topo.log $OUT/ 2>/dev/null
      done
    done
    python3 - $OUT/one_gpu.jsonl <<'PY'
import json, sys
rows = {r["label"]: r for r in map(json.loads, open(sys.argv[1])) if str(r.get("label", "")).startswith("mm-")}
for mm in ("vis", "qvl"):
    a, e = rows.get(f"mm-{mm}-agg-1"), rows.get(f"mm-{mm}-encode-1")
    if a and e:
        same = sum(x == y for x, y in zip(a["texts"], e["texts"]))
        ratio = [round(rows[f"mm-{mm}-encode-{r}"]["images_s"] / rows[f"mm-{mm}-agg-{r}"]["images_s"], 2)
                 for r in (1, 2) if f"mm-{mm}-encode-{r}" in rows and f"mm-{mm}-agg-{r}" in rows]
        print(f"[mm-{mm}] greedy texts equal {same}/{len(a['texts'])}; prompt tokens agg {a['prompt_tokens'][:2]} "
              f"encode {e['prompt_tokens'][:2]}; images/s encode/agg per round {ratio}; encode header {e['encode']}")
    a1, e1 = rows.get(f"mm-{mm}-agg-c1"), rows.get(f"mm-{mm}-encode-c1")
    if a1 and a:
        print(f"[mm-{mm}] agg's texts at c=1 equal its c=16 texts for {sum(x == y for x, y in zip(a1['texts'], a['texts']))}/8")
    if a1 and e1:
        print(f"[mm-{mm}] at c=1 encode and agg texts equal {sum(x == y for x, y in zip(a1['texts'], e1['texts']))}/8")
PY
    continue
  fi
  if [ $c = embed ]; then
    for w in dyn vllm; do
      if [ $w = dyn ]; then setsid python3 -m dynvllm serve embed --model $M --served-model-name m --http-host 127.0.0.1 \
          --http-port $P --namespace embed --gpu-memory-utilization 0.80 "${ENG[@]}" > /tmp/og_embed_$w.log 2>&1 &
      else setsid python3 -m vllm.entrypoints.openai.api_server --model $M --served-model-name m --host 127.0.0.1 \
          --port $P --runner pooling --convert embed --gpu-memory-utilization 0.80 --disable-uvicorn-access-log \
          "${ENG[@]}" > /tmp/og_embed_$w.log 2>&1 &
      fi
      p=$!; ALL+=($p); t0=$(date +%s); ok=0
      for i in $(seq 1 ${READY_S:-300}); do curl -sf http://127.0.0.1:$P/v1/models | grep -q '"m"' && { ok=1; break; }
        kill -0 $p 2>/dev/null || break; sleep 1; done
      echo "[embed-$w] ready=$ok after $(( $(date +%s)-t0 )) s"
      if [ $ok = 1 ]; then mkdir -p /tmp/emb
        for r in a b; do python3 $HERE/embed_bench.py http://127.0.0.1:$P m $M embed-$w-$r /tmp/emb ${EMBED_N:-512} 200 16; done
      else tail -5 /tmp/og_embed_$w.log; fi
      stop $p; cp /tmp/og_embed_$w.log $OUT/ 2>/dev/null
    done
    cp /tmp/emb/embed_bench.jsonl $OUT/ 2>/dev/null
    python3 $HERE/embed_bench.py compare /tmp/emb/embed_vec_embed-vllm-a.json /tmp/emb/embed_vec_embed-dyn-a.json |
      tee -a $OUT/one_gpu.jsonl
    continue
  fi
  if ready $n; then
    echo "[$c] ready after $(( $(date +%s)-t0 )) s"
    if [ $c = lora ]; then
      python3 -m dynvllm lora load a1 --source /tmp/adapter --namespace $c
      models=$(curl -s http://127.0.0.1:$P/v1/models | python3 -c 'import json,sys; print([m["id"] for m in json.load(sys.stdin)["data"]])')
      base=$(chat m "the river runs past the old mountain road and"); adapted=$(chat a1 "the river runs past the old mountain road and")
      echo "[lora] models $models; base $base; adapter $adapted"
      echo "{\"label\": \"lora\", \"models\": \"$models\", \"base\": $base, \"adapter\": $adapted}" >> $OUT/one_gpu.jsonl
      for mname in m a1; do
        python3 $HERE/loadgen.py --url http://127.0.0.1:$P --model $mname --tokenizer $M --input-tokens 1000 --output-tokens 200 \
          --ignore-eos --label lora-$mname --out $OUT/one_gpu_load.jsonl --timeout 300 --concurrency 16 --requests 64
      done
    else
      python3 $HERE/dp_probe.py http://127.0.0.1:$P $c $OUT/one_gpu.jsonl
    fi
  else echo "[$c] not ready"; tail -5 /tmp/og_$c*.log; fi
  stop "${pids[@]}"; cp /tmp/og_$c*.log $OUT/ 2>/dev/null
done
