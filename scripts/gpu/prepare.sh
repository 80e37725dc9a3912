#!/usr/bin/env bash
# prepare.sh OUTDIR  -- run on a machine with pip access (any x86-64 Linux, any Python >= 3.9).
# Downloads vllm 0.26.0 (CUDA 13 / torch 2.11.0) + the Python deps that the device image lacks,
# installs them into a staging tree for CPython 3.12 manylinux x86-64, deletes what an H100/H200
# never loads, packs it as one tar.xz and splits it into OUTDIR/c1, OUTDIR/c2, ... (<= 60 MiB each).
# OUTDIR must be an ignored folder of the repo that the device calls send (.git/info/exclude).
set -euo pipefail
OUT=${1:?usage: prepare.sh OUTDIR}
WORK=${WORK:-$OUT/.work}           # wheel cache + staging (not carried: the device calls carry OUT/cN only)
CHUNK=${CHUNK:-60M}
PKGS=${PKGS:-"vllm==0.26.0
xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 llguidance==1.7.6 openai-harmony==0.0.8
model-hosting-container-standards==0.1.16 jmespath==1.1.0 supervisor==4.3.0
fastapi==0.136.3 starlette==1.10.0 uvicorn==0.54.0 python-multipart==0.0.34
pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 jiter==0.19.0 sniffio==1.3.1 truststore==0.10.5
prometheus-fastapi-instrumentator==8.1.0 cachetools==8.0.2 blake3==1.0.11 cbor2==6.3.0
msgspec==0.22.0 pyzmq==27.3.0 pybase64==1.5.1 ijson==3.6.0 setproctitle==1.3.8
python-json-logger==4.2.0 watchfiles==1.3.0 partial-json-parser==0.2.1.1.post7
jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
lark==1.2.2 compressed-tensors==0.17.0 depyf==0.20.0 astor==0.8.1 dill==0.4.1
lm-format-enforcer==0.11.3 interegular==0.3.3 outlines_core==0.2.14"}
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_31_x86_64
 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux_2_24_x86_64"
mkdir -p "$WORK/whl" "$OUT"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d "$WORK/whl" $PKGS
rm -rf "$WORK/site"
# shellcheck disable=SC2086
python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
  --target "$WORK/site" "$WORK"/whl/*.whl
S=$WORK/site
# Slimming: files Hopper never loads for a dense bf16 model (see README.md for why each is safe).
rm -f  "$S/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so"   # FA2: Hopper uses FA3 (fa_utils.get_flash_attn_version)
rm -f  "$S/vllm/_moe_C_stable_libtorch.abi3.so"       # MoE kernels: import is wrapped in suppress(ImportError)
rm -f  "$S/vllm/_flashmla_C.abi3.so" "$S/vllm/_qutlass_C.abi3.so"  # MLA / FP4, optional imports
rm -f  "$S/vllm/vllm-rs"                               # Rust frontend, only with VLLM_USE_RUST_FRONTEND=1
rm -rf "$S/vllm/third_party/deep_gemm" "$S/vllm/third_party/fmha_sm100"  # FP8 block GEMM / SM100 only
rm -rf "$S/bin"
find "$S" -name __pycache__ -type d -prune -exec rm -rf {} +
du -sh "$S"
rm -rf "$OUT"/c[0-9]* "$OUT/payload.tar.xz"
tar -C "$S" -cf - . | xz -9e -T0 -c > "$OUT/payload.tar.xz"
( cd "$OUT" && sha256sum payload.tar.xz > payload.sha256 && split -b "$CHUNK" -d -a 2 payload.tar.xz part. )
i=0; for p in "$OUT"/part.*; do i=$((i+1)); mkdir -p "$OUT/c$i"; mv "$p" "$OUT/c$i/"; done
cp "$OUT/payload.sha256" "$OUT/c$i/"
rm -f "$OUT/payload.tar.xz"
ls -la "$OUT"/c*/
echo "chunks: $i  (carry $OUT/c1 .. $OUT/c$i, one per device call)"
