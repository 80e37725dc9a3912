"""The kubernetes connector through the real `kubernetes` client over real HTTP, against a
REPLAYED API EXCHANGE: no kube-apiserver can be started on this machine (no registry here
carries one), so a small local HTTP server answers as the API server does for the calls the
connector makes (apps/v1 deployments/scale read and merge-patch, v1 pods list by field selector
and merge-patch, 403/404 Status bodies, a JSON patch refused), with the bodies of the Kubernetes
API reference. It keeps the replica counts it was given, so a read after a patch sees it.
"""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from dynvllm.planner.connector import ConnectorError
from dynvllm.planner.decide import Decision
from dynvllm.runtime.discovery import Instance
from dynvllm.settings import build_settings

pytest.importorskip("kubernetes")
from dynvllm_plugins.planner.kubernetes import DELETION_COST, KubernetesConnector

NS = "serving"
TOKEN = "planner-token"


def status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def scale(name: str, replicas: int) -> dict:
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {"name": name, "namespace": NS, "uid": "6f1c", "resourceVersion": "4711"},
        "spec": {"replicas": replicas},
        "status": {"replicas": replicas, "selector": f"app.kubernetes.io/name={name}"},
    }


def pod(name: str, ip: str, annotations: dict) -> dict:
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": NS, "annotations": annotations},
        "spec": {"containers": [{"name": "worker", "image": "ghcr.io/dynvllm/dynvllm:0.1.0"}]},
        "status": {"phase": "Running", "podIP": ip},
    }


class ApiServer:
    """The replayed API server: deployments' replicas, pods by IP, every request it saw."""

    def __init__(self) -> None:
        self.replicas = {"dynvllm-worker": 2}
        self.pods = {"dynvllm-worker-7d9f-abcde": "10.1.0.7", "dynvllm-worker-7d9f-fghij": "10.1.0.8"}
        self.annotations: dict[str, dict] = {name: {} for name in self.pods}
        self.forbidden: set[str] = set()
        self.seen: list[tuple[str, str, str, object]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_PATCH(self) -> None:
                self._handle("PATCH")

            def _handle(self, method: str) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                ctype = self.headers.get("Content-Type", "")
                api.seen.append((method, self.path, ctype, body))
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._send(401, status(401, "Unauthorized", "Unauthorized"))
                if (
                    method == "PATCH"
                    and ctype == "application/json-patch+json"
                    and not isinstance(body, list)
                ):
                    msg = "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
                    return self._send(400, status(400, "BadRequest", msg))
                parts = url.path.strip("/").split("/")
                if parts[:4] == ["apis", "apps", "v1", "namespaces"] and parts[5:6] == ["deployments"]:
                    name = parts[6]
                    if name not in api.replicas:
                        return self._send(
                            404, status(404, "NotFound", f'deployments.apps "{name}" not found')
                        )
                    if method == "PATCH":
                        if name in api.forbidden:
                            msg = (
                                f'deployments.apps "{name}" is forbidden: User "system:serviceaccount:{NS}:'
                                'dynvllm-planner" cannot patch resource "deployments/scale" '
                                'in API group "apps"'
                            )
                            return self._send(403, status(403, "Forbidden", msg))
                        api.replicas[name] = body["spec"]["replicas"]
                    return self._send(200, scale(name, api.replicas[name]))
                if parts[:4] == ["api", "v1", "namespaces", NS] and parts[4:5] == ["pods"]:
                    if method == "GET":
                        selector = parse_qs(url.query).get("fieldSelector", [""])[0]
                        items = [
                            pod(n, ip, api.annotations[n])
                            for n, ip in api.pods.items()
                            if selector == f"status.podIP={ip}"
                        ]
                        return self._send(
                            200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
                        )
                    name = parts[5]
                    api.annotations[name].update(body["metadata"]["annotations"])
                    return self._send(200, pod(name, api.pods[name], api.annotations[name]))
                return self._send(
                    404, status(404, "NotFound", "the server could not find the requested resource")
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api(tmp_path, monkeypatch):
    server = ApiServer()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": {"server": server.url}}],
                "users": [{"name": "planner", "user": {"token": TOKEN}}],
                "contexts": [
                    {"name": "test", "context": {"cluster": "test", "user": "planner", "namespace": NS}}
                ],
                "current-context": "test",
            }
        )
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    server.kubeconfig = kubeconfig
    yield server
    server.close()


def connector(api: ApiServer, **planner) -> KubernetesConnector:
    settings = build_settings(
        {"planner": {"planner_connector": "kubernetes", "k8s_kubeconfig": api.kubeconfig, **planner}}
    )
    return KubernetesConnector(settings, None)


def test_reads_and_patches_the_scale_subresource_of_the_roles_deployment(api):
    conn = connector(api)
    assert conn.namespace == NS  # the kubeconfig context's
    assert asyncio.run(conn.workers("agg")) == 2
    asyncio.run(conn.apply(Decision("agg", 2, 4, start=2), {}))
    assert asyncio.run(conn.workers("agg")) == 4
    path = f"/apis/apps/v1/namespaces/{NS}/deployments/dynvllm-worker/scale"
    assert [(m, p.split("?")[0], c, b) for m, p, c, b in api.seen] == [
        ("GET", path, "", None),
        ("PATCH", path, "application/merge-patch+json", {"spec": {"replicas": 4}}),
        ("GET", path, "", None),
    ]


def test_a_scale_down_marks_the_chosen_workers_pods_to_go_first(api):
    conn = connector(api)
    worker = Instance("w1", "worker", role="agg", host="10.1.0.8", pid=7)
    asyncio.run(conn.apply(Decision("agg", 2, 1, drain=("w1",)), {"w1": worker}))
    assert api.annotations == {
        "dynvllm-worker-7d9f-abcde": {},
        "dynvllm-worker-7d9f-fghij": {DELETION_COST: "-1000"},
    }
    assert api.replicas["dynvllm-worker"] == 1
    methods = [(m, p.split("?")[0]) for m, p, _, _ in api.seen]
    assert methods == [
        ("GET", f"/api/v1/namespaces/{NS}/pods"),
        ("PATCH", f"/api/v1/namespaces/{NS}/pods/dynvllm-worker-7d9f-fghij"),
        ("PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/dynvllm-worker/scale"),
    ]
    assert "fieldSelector=status.podIP%3D10.1.0.8" in api.seen[0][1]


def test_refusals_name_the_cause(api):
    conn = connector(api)
    with pytest.raises(ConnectorError, match=r"404 Not Found.*--k8s-deployments"):
        asyncio.run(conn.workers("prefill"))  # dynvllm-worker-prefill is not there
    api.forbidden.add("dynvllm-worker")
    with pytest.raises(ConnectorError, match=r"403 Forbidden.*RBAC of deploy/k8s/planner"):
        asyncio.run(conn.apply(Decision("agg", 2, 3, start=1), {}))
    assert api.replicas["dynvllm-worker"] == 2


def test_deployments_by_role_and_namespace_from_settings(api):
    conn = connector(api, k8s_namespace="other", k8s_deployments="decode=llm-decode, prefill=llm-prefill")
    assert conn.namespace == "other"
    ps = conn.ps
    assert (ps.deployment("decode"), ps.deployment("prefill"), ps.deployment("agg")) == (
        "llm-decode",
        "llm-prefill",
        "dynvllm-worker",
    )
    with pytest.raises(ValueError, match="role=deployment pairs"):
        build_settings({"planner": {"k8s_deployments": "decode"}})


def test_an_unreachable_api_server_is_a_connector_error(api):
    conn = connector(api)
    api.close()
    with pytest.raises(ConnectorError, match="reading deployments/dynvllm-worker/scale"):
        asyncio.run(conn.workers("agg"))
