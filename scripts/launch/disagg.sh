#!/usr/bin/env bash
# Disaggregated serving: prefill workers compute the prompt's KV cache and decode workers pull it
# over the KV connector (NIXL by default) and generate. One process per role, joined by NATS.
#   MODEL=Qwen/Qwen3-0.6B GPUS="0 1" ./scripts/launch/disagg.sh
# PREFILL_WORKERS, DECODE_WORKERS (default 1 each), CONNECTOR (default nixl) and everything in
# common.sh come from the environment. GPUS hands devices to prefill workers first, then decode.
PREFILL_WORKERS=${PREFILL_WORKERS:-1}
DECODE_WORKERS=${DECODE_WORKERS:-1}
CONNECTOR=${CONNECTOR:-nixl}
ROUTER=${ROUTER:-round-robin}
source "$(dirname "$0")/common.sh"

start_nats
start_frontend
for ((i = 0; i < PREFILL_WORKERS; i++)); do start_worker "prefill-$i" prefill --connector "$CONNECTOR"; done
for ((i = 0; i < DECODE_WORKERS; i++)); do start_worker "decode-$i" decode --connector "$CONNECTOR"; done
wait_ready $((PREFILL_WORKERS + DECODE_WORKERS))
serve_until_stopped
