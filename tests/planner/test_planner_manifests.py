"""deploy/k8s/planner: rendered with kustomize, valid for Kubernetes, its settings real, and its
RBAC exactly what the kubernetes connector calls on the Deployments the overlays create."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from dynvllm import settings as S

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = shutil.which("kustomize", path=str(Path(sys.executable).parent)) or shutil.which("kustomize")
pytestmark = pytest.mark.skipif(KUSTOMIZE is None, reason="kustomize is not installed (scripts/install.sh)")


def render(target: str) -> list[dict]:
    assert KUSTOMIZE is not None
    out = subprocess.run(
        [KUSTOMIZE, "build", str(ROOT / "deploy" / "k8s" / target)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_planner_manifests_are_valid_and_name_real_settings():
    docs = render("planner")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("ServiceAccount", "dynvllm-planner"), ("Deployment", "dynvllm-planner")} <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deploy["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "dynvllm-planner"
    (c,) = pod["containers"]
    assert c["command"] == ["dynvllm", "planner"] and c["image"] == "ghcr.io/dynvllm/dynvllm:0.1.0"
    env = {e["name"]: e.get("value") for e in c["env"] if e["name"].startswith("DYN_")}
    names = {S.env_name(f): (g, f) for g, cls in S.groups().items() for f in cls.model_fields}
    assert set(env) <= set(names), set(env) - set(names)
    overrides: dict[str, dict] = {}
    for var, value in env.items():
        if "$(" not in (value or ""):
            group, field = names[var]
            overrides.setdefault(group, {})[field] = value
    ps = S.build_settings(overrides).planner
    assert ps.planner_connector == "kubernetes"
    # The headless Service the planner reads every frontend through selects the frontend pods.
    frontends = [
        d for d in render("overlays/agg") if d["kind"] == "Deployment" and "frontend" in d["metadata"]["name"]
    ]
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    assert svc["spec"]["clusterIP"] == "None"
    assert ps.frontend_url == f"http://{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    labels = frontends[0]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()


def test_rbac_allows_what_the_connector_calls_on_the_overlays_deployments():
    docs = render("planner")
    (role,) = [d for d in docs if d["kind"] == "Role"]
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "dynvllm-planner"}]
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r for r in role["rules"]}
    scale = rules[(("apps",), ("deployments/scale",))]
    assert sorted(scale["verbs"]) == ["get", "patch"]
    assert sorted(rules[(("",), ("pods",))]["verbs"]) == ["list", "patch"]
    ps = S.build_settings({}).planner
    workers = {
        d["metadata"]["name"]
        for target in ("overlays/agg", "overlays/disagg")
        for d in render(target)
        if d["kind"] == "Deployment" and "worker" in d["metadata"]["name"]
    }
    defaults = {ps.deployment(r) for r in ("agg", "prefill", "decode")}
    assert workers == defaults == set(scale["resourceNames"])
