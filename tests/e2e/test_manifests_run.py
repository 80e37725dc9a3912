"""The rendered Kubernetes overlays run as a kubelet would run them (tests/k8s_local.py): NATS from
the StatefulSet's spec (three servers with routes), each Deployment's pod (one replica) from its
command, args, environment (the ConfigMap through envFrom, fieldRefs, $(VAR) references), ports
and probes; requests through the frontend Service's port; termination with the preStop hook,
SIGTERM and the grace period, while a stream is in flight.

What an operator sets for a deployment is set in the ConfigMap here too: the model (the tiny test
model) and its names. The engine is the sim engine (DYN_ENGINE, a setting the ConfigMap may
carry), so the pods cost no vLLM start-up; the real engine in the CPU image is
tests/test_images.py's subject. Resources (GPUs) and volumes have no local meaning and are left
out."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import wait_gone
from tests.k8s_local import (
    LocalPod,
    NatsCluster,
    by_kind,
    docker,
    docker_unavailable,
    http_status,
    make_pod,
    service_url,
)
from tests.test_deploy import KUSTOMIZE, ROOT, render

pytestmark = pytest.mark.skipif(
    KUSTOMIZE is None, reason="kustomize is not installed (./scripts/install.sh fetches it with npm)"
)
STEP_MS = 50


def deployment_config(docs: list[dict], tiny_model) -> dict[str, dict]:
    configmaps = by_kind(docs, "ConfigMap")
    configmaps["dynvllm-config"]["data"].update(
        DYN_MODEL=str(tiny_model),
        DYN_SERVED_MODEL_NAME="tiny",
        DYN_MODEL_ALIASES="short=tiny",
        DYN_ENGINE="sim",
        DYN_ENGINE_ARGS=f"--sim-decode-ms-per-step {STEP_MS}",
    )
    return configmaps


def stream(url: str, body: dict, out: dict) -> None:
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        out["status"] = r.status_code
        out["lines"] = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                out["lines"].append(line)
                out.setdefault("first", time.monotonic())


def terminate_all(pods: list[LocalPod]) -> dict[str, int]:
    """Pod deletions at once (a rollout, a node drain): each pod's termination on its own thread."""
    rcs: dict[str, int] = {}
    threads = [threading.Thread(target=lambda p=p: rcs.__setitem__(p.name, p.terminate())) for p in pods]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return rcs


def cpu_image() -> str:
    """The CPU tag of scripts/build_images.sh, built beforehand (this test does not build it)."""
    why = docker_unavailable()
    if why:
        pytest.skip(f"{why}: pods run as containers only with a Docker engine")
    tag = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_images.sh"), "--print-tags"],
        env={**os.environ, "TARGETS": "cpu"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not docker("image", "inspect", tag, check=False, timeout=30):
        pytest.skip(f"{tag} is not built (TARGETS=cpu scripts/build_images.sh)")
    return tag


def readable_copy(model: Path, dest: Path) -> Path:
    """The images run as uid 1000; the suite's model files are the runner's own (0600)."""
    shutil.copytree(model, dest)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


@pytest.mark.parametrize(
    "overlay,runner",
    [
        ("overlays/agg", "process"),
        ("overlays/disagg", "process"),
        ("overlays/agg", "container"),
        ("overlays/disagg", "container"),
    ],
)
def test_overlay_pods_start_serve_and_drain(overlay, runner, tiny_model, tmp_path):
    container: dict = {}
    if runner == "container":
        # The manifests name the GPU image; on this CPU host its CPU sibling runs the same pods.
        tiny_model = readable_copy(tiny_model, tmp_path / "model")
        container = {"image": cpu_image(), "mounts": [str(tiny_model)]}
    docs = render(overlay)
    cluster = NatsCluster(docs, tmp_path / "nats")
    configmaps = deployment_config(docs, tiny_model)
    deploys = by_kind(docs, "Deployment")
    pods = {name: make_pod(d, configmaps, cluster.localize, **container) for name, d in deploys.items()}
    front = pods.pop("dynvllm-frontend")
    workers = list(pods.values())
    assert {w.container["command"][2] for w in workers} == (
        {"agg"} if overlay == "overlays/agg" else {"prefill", "decode"}
    )
    pids: list[int] = []
    try:
        cluster.start()
        # The kubelet's environment, made local: every NATS server, this host, mapped ports.
        assert front.env["DYN_NATS_URL"].split(",") == cluster.urls
        assert front.env["DYN_HTTP_PORT"] == str(front.port("http"))
        for w in workers:
            assert w.env["DYN_ADVERTISE_HOST"] == "127.0.0.1"
            assert w.env["DYN_METRICS_PORT"] == str(w.port("metrics"))
            assert w.env["DYN_RPC_PORT"] == str(w.port("rpc"))
            assert "HF_TOKEN" not in w.env  # the optional Secret is absent

        front.start(tmp_path / "frontend.log")
        front.wait_probe("livenessProbe", timeout=120)
        # Not ready while no worker can serve: the Service sends it no traffic yet.
        assert http_status(front.probe_url("readinessProbe")) == 503
        for w in workers:
            w.start(tmp_path / f"{w.name}.log")
        for w in workers:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                w.wait_probe(probe, timeout=240)
        front.wait_probe("readinessProbe", timeout=120)
        # Every pod registered (a pod's probes pass before the frontend has heard of it).
        health = f"http://127.0.0.1:{front.port('http')}/health"
        deadline = time.monotonic() + 60
        while httpx.get(health, timeout=5).json().get("workers") != len(workers):
            assert time.monotonic() < deadline, front.tail()
            time.sleep(0.3)
        pids = [pid for pod in [front, *workers] for pid in pod.pids()]

        base = service_url(by_kind(docs, "Service")["dynvllm-frontend"], [front])
        # Long enough for the disagg overlay's prefill hop (DYN_DISAGG_MIN_PROMPT_TOKENS).
        prompt = " ".join(f"w{i}" for i in range(400))
        r = httpx.post(
            base + "/v1/chat/completions",
            json={"model": "short", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "short" and body["usage"]["completion_tokens"] == 8
        assert body["choices"][0]["message"]["content"]
        if overlay == "overlays/disagg":
            metrics = httpx.get(base + "/metrics", timeout=10).text
            # The prefill pod took the hop; the sim engine returns no KV to transfer, so the decode
            # pod computed the prompt itself (NIXL transfer is tests/e2e/test_disagg.py's subject).
            hops = re.findall(r'dynvllm_disagg_prefill_total\{[^}]*outcome="(\w+)"[^}]*\} (\S+)', metrics)
            assert ("no_transfer_params", "1.0") in hops, hops

        # A stream outlasting the frontend's preStop hook, then both pods deleted at once.
        out: dict = {}
        tokens = 200
        req = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "drain me"}],
            "max_tokens": tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        t = threading.Thread(target=stream, args=(base + "/v1/chat/completions", req, out))
        t.start()
        deadline = time.monotonic() + 30
        while "first" not in out and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "first" in out, out
        rcs = terminate_all([front, *workers])
        t.join(60)
        assert out["status"] == 200
        assert out["lines"][-1] == "data: [DONE]"
        assert f'"completion_tokens":{tokens}' in out["lines"][-2]
        assert all(rc == 0 for rc in rcs.values()), rcs
        for pod in [front, *workers]:
            assert pod.exit_after is not None
            assert pod.exit_after < pod.spec["terminationGracePeriodSeconds"], (pod.name, pod.exit_after)
        # The frontend ran its preStop hook before SIGTERM, and drained after it.
        assert front.exit_after >= 5 and tokens * STEP_MS / 1000 > 5
    finally:
        for pod in [front, *workers]:
            pod.kill()
        cluster.stop()
    assert not wait_gone(pids)
