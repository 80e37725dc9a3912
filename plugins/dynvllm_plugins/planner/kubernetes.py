"""The `kubernetes` planner connector: sets the replica count of each role's Deployment through
its scale subresource (`deployments/scale`), with the official `kubernetes` client (the `k8s`
extra), in-cluster or from a kubeconfig. RBAC for it: deploy/k8s/planner.

Kubernetes starts and stops the pods; a stopped worker pod gets SIGTERM and drains (no new
requests, streams finish within the pod's grace period). To make the ReplicaSet remove the
workers the planner chose (the least busy), their pods are first annotated with a low
`controller.kubernetes.io/pod-deletion-cost`; they are found by the address each worker
announces (its pod IP). The client is synchronous, so its calls run in a thread.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from dynvllm.planner.connector import ConnectorError
from dynvllm.planner.decide import Decision
from dynvllm.settings import Settings

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
# The patches below are JSON merge patches; the client would otherwise send a dict as a JSON
# patch (its first JSON content type), which the API server refuses.
MERGE = "application/merge-patch+json"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _client(kubeconfig: Path | None) -> tuple[Any, str | None]:
    """An API client and the namespace its configuration names (None: none named)."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise ConnectorError(
            "the kubernetes connector needs the kubernetes client: pip install 'dynvllm[k8s]'"
        ) from None
    try:
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
            ns = SERVICE_ACCOUNT_NAMESPACE.read_text().strip() if SERVICE_ACCOUNT_NAMESPACE.exists() else None
            return client.ApiClient(cfg), ns
        path = str(kubeconfig) if kubeconfig else None
        _, context = config.list_kube_config_contexts(config_file=path)
        api = config.new_client_from_config(config_file=path)
        return api, (context or {}).get("context", {}).get("namespace")
    except (config.ConfigException, OSError) as exc:
        raise ConnectorError(f"no Kubernetes configuration ({exc}): pass --k8s-kubeconfig") from None


class KubernetesConnector:
    def __init__(self, settings: Settings, nc: Any) -> None:
        ps = self.ps = settings.planner
        api, namespace = _client(ps.k8s_kubeconfig)
        from kubernetes import client

        self.apps, self.core = client.AppsV1Api(api), client.CoreV1Api(api)
        self.namespace = ps.k8s_namespace or namespace or "default"

    async def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return await asyncio.to_thread(fn, *args, _request_timeout=15, **kwargs)
        except ApiException as exc:
            hint = {
                403: " (the planner's service account lacks the RBAC of deploy/k8s/planner)",
                404: " (name the role's Deployment with --k8s-deployments)",
            }.get(exc.status or 0, "")
            raise ConnectorError(f"{what}: the API server answered {exc.status} {exc.reason}{hint}") from None
        except Exception as exc:  # connection refused, TLS, timeout: the API server is unreachable
            raise ConnectorError(f"{what}: {type(exc).__name__}: {exc}") from None

    async def workers(self, role: str) -> int | None:
        name = self.ps.deployment(role)
        scale = await self._call(
            f"reading deployments/{name}/scale in {self.namespace}",
            self.apps.read_namespaced_deployment_scale,
            name,
            self.namespace,
        )
        return int(scale.spec.replicas or 0)

    async def apply(self, decision: Decision, instances: dict[str, Any]) -> None:
        name = self.ps.deployment(decision.role)
        for worker in decision.drain:
            inst = instances.get(worker)
            if inst is not None and inst.host:
                await self._prefer_removing(inst.host)
        await self._call(
            f"scaling deployments/{name} in {self.namespace} to {decision.target}",
            self.apps.patch_namespaced_deployment_scale,
            name,
            self.namespace,
            {"spec": {"replicas": decision.target}},
            _content_type=MERGE,
        )

    async def _prefer_removing(self, pod_ip: str) -> None:
        pods = await self._call(
            f"finding the pod of {pod_ip}",
            self.core.list_namespaced_pod,
            self.namespace,
            field_selector=f"status.podIP={pod_ip}",
        )
        for pod in pods.items:
            await self._call(
                f"marking pod {pod.metadata.name} to be removed first",
                self.core.patch_namespaced_pod,
                pod.metadata.name,
                self.namespace,
                {"metadata": {"annotations": {DELETION_COST: "-1000"}}},
                _content_type=MERGE,
            )
