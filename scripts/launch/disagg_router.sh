#!/usr/bin/env bash
# Disaggregated serving with the KV-cache-aware router choosing both the prefill worker (most of
# the prompt already cached) and the decode worker; KV moves over the connector (NIXL by default).
#   MODEL=Qwen/Qwen3-0.6B GPUS="0 1 2 3" ./scripts/launch/disagg_router.sh
# PREFILL_WORKERS, DECODE_WORKERS (default 2 each), ROUTER (default kv) and everything in
# disagg.sh and common.sh come from the environment.
PREFILL_WORKERS=${PREFILL_WORKERS:-2} DECODE_WORKERS=${DECODE_WORKERS:-2} ROUTER=${ROUTER:-kv} \
  exec "$(dirname "$0")/disagg.sh"
