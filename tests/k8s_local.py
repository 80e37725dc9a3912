"""Rendered Kubernetes objects run as local processes, the way a kubelet would run them.

A pod spec becomes a process: its command and args, its environment (the ConfigMap's variables
through `envFrom`, then `env`, with `fieldRef`s and `$(VAR)` references resolved as the kubelet
resolves them), its probes called on its ports, and termination as the kubelet does it (preStop,
then SIGTERM, then SIGKILL at the end of `terminationGracePeriodSeconds`). Every pod shares this
host, so each container port is mapped to a free one; an environment value naming a container
port is rewritten to the mapped port, and Service or per-pod DNS names to their local address.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import Proc, free_port

LOCAL = "127.0.0.1"


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def http_status(url: str, timeout: float = 2.0) -> int:
    """What a kubelet's httpGet probe sees: the status code, or 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def wait_status(url: str, want: int = 200, timeout: float = 120, alive=None) -> None:
    deadline = time.monotonic() + timeout
    got = 0
    while time.monotonic() < deadline:
        got = http_status(url)
        if got == want:
            return
        if alive is not None and not alive():
            break
        time.sleep(0.3)
    raise AssertionError(f"{url}: {got}, not {want}")


# ---------------------------------------------------------------------------------------- NATS
class NatsCluster:
    """The NATS StatefulSet: one nats-server per replica, each with the ConfigMap's nats.conf
    mounted where the pod mounts it, its ports mapped and the routes' pod names made local."""

    def __init__(self, docs: list[dict], workdir: Path) -> None:
        from dynvllm.runtime.nats import nats_server_binary

        self.sts = by_kind(docs, "StatefulSet")["dynvllm-nats"]
        self.binary = nats_server_binary()
        self.workdir = workdir
        spec = pod_spec(self.sts)
        self.container = spec["containers"][0]
        self.replicas = self.sts["spec"]["replicas"]
        self.headless = self.sts["spec"]["serviceName"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        configmaps = by_kind(docs, "ConfigMap")
        self.mounts = {}  # mount path -> {file name: text} for ConfigMap volumes
        for m in self.container["volumeMounts"]:
            cm = volumes.get(m["name"], {}).get("configMap")
            if cm:
                self.mounts[m["mountPath"]] = configmaps[cm["name"]]["data"]
        self.ports = [
            {p["containerPort"]: free_port() for p in self.container["ports"]} for _ in range(self.replicas)
        ]
        self.names = [f"{self.sts['metadata']['name']}-{i}" for i in range(self.replicas)]
        self.procs: list[subprocess.Popen | None] = [None] * self.replicas
        self.logs: list[Path] = []

    def port(self, i: int, name: str) -> int:
        by_name = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        return self.ports[i][by_name[name]]

    def url(self, i: int) -> str:
        return f"nats://{LOCAL}:{self.port(i, 'client')}"

    @property
    def urls(self) -> list[str]:
        return [self.url(i) for i in range(self.replicas)]

    def localize(self, text: str) -> str:
        """Per-pod DNS names (pod.headless[:port]) -> this host and the pod's mapped port."""

        def sub(m: re.Match) -> str:
            i, port = self.names.index(m.group(1)), int(m.group(2))
            return f"{LOCAL}:{self.ports[i][port]}"

        names = "|".join(re.escape(n) for n in self.names)
        return re.sub(rf"({names})\.{re.escape(self.headless)}(?:\.[\w.-]+)?:(\d+)", sub, text)

    def _conf(self, i: int, text: str) -> str:
        text = self.localize(text)
        mapped = self.ports[i]
        # The pod's own ports (`port: 4222`, ...) and its data volume, on this host.
        text = re.sub(
            r"\b(port|http_port):\s*(\d+)", lambda m: f"{m.group(1)}: {mapped[int(m.group(2))]}", text
        )
        data = self.workdir / f"data-{i}"
        data.mkdir(parents=True, exist_ok=True)
        text = text.replace("/data", str(data))
        return f"host: {LOCAL}\n" + text.replace("cluster {", f"cluster {{\n  host: {LOCAL}", 1)

    def start(self) -> None:
        for i in range(self.replicas):
            self.start_one(i)
        for i in range(self.replicas):
            self.wait_ready(i)
        self.wait_meta_leader()

    def start_one(self, i: int) -> None:
        args = list(self.container.get("args", []))
        for mount, files in self.mounts.items():
            local = self.workdir / f"conf-{i}" / mount.strip("/").replace("/", "_")
            local.mkdir(parents=True, exist_ok=True)
            for fname, text in files.items():
                (local / fname).write_text(self._conf(i, text))
            args = [a.replace(mount, str(local)) for a in args]
        log = self.workdir / f"nats-{i}.log"
        env = {"POD_NAME": self.names[i], "PATH": "/usr/bin:/bin"}
        fh = open(log, "ab")
        self.procs[i] = subprocess.Popen([self.binary, *args], stdout=fh, stderr=subprocess.STDOUT, env=env)
        fh.close()
        self.logs.append(log)

    def probe_url(self, i: int, probe: str = "readinessProbe") -> str:
        get = self.container[probe]["httpGet"]
        return f"http://{LOCAL}:{self.port(i, get['port'])}{get['path']}"

    def wait_ready(self, i: int, timeout: float = 30) -> None:
        proc = self.procs[i]
        assert proc is not None
        wait_status(self.probe_url(i), timeout=timeout, alive=lambda: proc.poll() is None)

    def monitor(self, i: int, path: str) -> dict:
        import json

        with urllib.request.urlopen(f"http://{LOCAL}:{self.port(i, 'monitor')}{path}", timeout=3) as r:
            return json.load(r)

    def wait_meta_leader(self, timeout: float = 30) -> str:
        """JetStream's cluster formed: every running server names the same meta leader."""
        deadline = time.monotonic() + timeout
        leaders: set = set()
        while time.monotonic() < deadline:
            try:
                leaders = {
                    self.monitor(i, "/jsz").get("meta_cluster", {}).get("leader")
                    for i in range(self.replicas)
                    if self.alive(i)
                }
            except OSError:
                leaders = set()
            if len(leaders) == 1 and None not in leaders and "" not in leaders:
                return leaders.pop()
            time.sleep(0.3)
        raise AssertionError(f"no JetStream meta leader: {leaders}")

    def alive(self, i: int) -> bool:
        p = self.procs[i]
        return p is not None and p.poll() is None

    def client_count(self, i: int) -> int:
        return int(self.monitor(i, "/connz")["num_connections"])

    def kill(self, i: int) -> None:
        p = self.procs[i]
        assert p is not None
        p.kill()
        p.wait()

    def stop(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.terminate()
        for p in self.procs:
            if p is not None:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


# ----------------------------------------------------------------------------------------- pods
@dataclass
class LocalPod:
    """One replica of a Deployment's pod (its first container) as a local dynvllm process."""

    name: str
    spec: dict
    env: dict[str, str]
    ports: dict[int, int]  # container port -> port on this host
    labels: dict[str, str] = field(default_factory=dict)
    proc: Proc | None = None
    exit_after: float | None = None  # seconds from termination start to exit

    @property
    def container(self) -> dict:
        return self.spec["containers"][0]

    def port(self, ref: int | str) -> int:
        if isinstance(ref, int):
            return self.ports[ref]
        return self.ports[next(p["containerPort"] for p in self.container["ports"] if p["name"] == ref)]

    def probe_url(self, probe: str) -> str:
        get = self.container[probe]["httpGet"]
        return f"http://{LOCAL}:{self.port(get['port'])}{get['path']}"

    def start(self, log: Path) -> None:
        c = self.container
        argv = [*c["command"], *c.get("args", [])]
        assert argv[0] == "dynvllm", argv
        self.proc = Proc(argv[1:], log, env=self.env)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.p.poll() is None

    def tail(self) -> str:
        return self.proc.tail() if self.proc else ""

    def pids(self) -> list[int]:
        """The pod's processes, as this host numbers them."""
        assert self.proc is not None
        return [p.pid for p in [self.proc.ps, *self.proc.descendants()]]

    def wait_probe(self, probe: str, timeout: float = 120) -> None:
        """Poll the probe until it passes, as the kubelet would (failureThreshold aside)."""
        try:
            wait_status(self.probe_url(probe), timeout=timeout, alive=self.alive)
        except AssertionError as exc:
            raise AssertionError(f"{self.name} {probe}: {exc}\n{self.tail()}") from None

    def terminate(self) -> int:
        """The kubelet's termination: the preStop hook, SIGTERM, SIGKILL when the grace period
        (which the hook's time counts against) runs out. The exit status."""
        assert self.proc is not None
        grace = float(self.spec.get("terminationGracePeriodSeconds", 30))
        start = time.monotonic()
        hook = self.container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        if hook:
            subprocess.run(hook, timeout=grace, check=True, env={**os.environ, **self.env})
        self.proc.p.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.p.wait(max(0.0, grace - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            rc = self.proc.kill_all()
        self.exit_after = time.monotonic() - start
        self.proc.fh.close()
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.p.poll() is None:
            self.proc.kill_all()
            self.proc.fh.close()


def docker_unavailable() -> str | None:
    """Why no Docker engine is usable here, or None when one answers its ping (fast: a test
    module decides at import whether to skip)."""
    import shutil
    import socket

    if shutil.which("docker") is None:
        return "no docker client on PATH"
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return None  # a remote engine: the client finds out
    path = host[len("unix://") :]
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(0.5)
            s.connect(path)
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = s.recv(1024)
    except OSError as exc:
        return f"no Docker engine at {path} ({exc.strerror or exc})"
    if b" 200 " not in reply.split(b"\r\n", 1)[0]:
        return f"the Docker engine at {path} did not answer its ping"
    return None


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"docker {' '.join(args)}: {out.stderr}"
    return out.stdout.strip()


@dataclass
class ContainerPod(LocalPod):
    """The same pod as a container of `image` on the host's network (every pod and NATS share
    it, as a cluster's pod network would let them), with `mounts` (host path -> read-only)."""

    image: str = ""
    mounts: list[str] = field(default_factory=list)
    cid: str = ""
    log: Path | None = None

    def start(self, log: Path) -> None:
        import uuid

        c = self.container
        env = [a for k, v in self.env.items() for a in ("-e", f"{k}={v}")]
        vols = [a for m in self.mounts for a in ("-v", f"{m}:{m}:ro")]
        self.cid = f"{self.name}-{uuid.uuid4().hex[:6]}"
        self.log = log
        # /dev/shm: the pod's memory-backed volume (vLLM's CPU executor shares tensors there).
        argv = [*c["command"], *c.get("args", [])]
        docker(
            "run",
            "-d",
            "--name",
            self.cid,
            "--network",
            "host",
            "--shm-size",
            "1g",
            *env,
            *vols,
            self.image,
            *argv,
        )

    def alive(self) -> bool:
        return (
            bool(self.cid) and docker("inspect", "-f", "{{.State.Running}}", self.cid, check=False) == "true"
        )

    def tail(self) -> str:
        if not self.cid:
            return ""
        cmd = ["docker", "logs", "--tail", "60", self.cid]  # the container's stdout and stderr
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
        return out.stdout

    def pids(self) -> list[int]:
        return [int(p) for p in docker("top", self.cid, "-eo", "pid").split()[1:]]

    def terminate(self) -> int:
        """The kubelet's termination through the engine: preStop with `docker exec`, then
        `docker stop` (SIGTERM to PID 1, tini; SIGKILL when the rest of the grace period ends)."""
        grace = float(self.spec.get("terminationGracePeriodSeconds", 30))
        start = time.monotonic()
        hook = self.container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        if hook:
            docker("exec", self.cid, *hook, timeout=grace)
        left = max(0, int(grace - (time.monotonic() - start)))
        docker("stop", "--time", str(left), self.cid, timeout=left + 30)
        self.exit_after = time.monotonic() - start
        return int(docker("inspect", "-f", "{{.State.ExitCode}}", self.cid))

    def kill(self) -> None:
        if self.cid:
            if self.log is not None:
                self.log.write_text(self.tail())
            docker("rm", "-f", self.cid, check=False)


_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def pod_env(
    spec: dict, configmaps: dict[str, dict], ports: dict[int, int], pod_name: str, localize
) -> dict[str, str]:
    """The container's environment as the kubelet builds it, made local: envFrom ConfigMaps,
    then env in order ($(VAR) expands earlier ones; fieldRefs; a missing optional Secret gives
    nothing), then port numbers and cluster DNS names rewritten for this host."""
    c = spec["containers"][0]
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        env.update(configmaps[src["configMapRef"]["name"]]["data"])
    fields = {"status.podIP": LOCAL, "metadata.name": pod_name}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = _REF.sub(lambda m: env.get(m.group(1), m.group(0)), e["value"])
            continue
        ref = e["valueFrom"]
        if "fieldRef" in ref:
            env[e["name"]] = fields[ref["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in ref:
            assert ref["secretKeyRef"].get("optional"), f"{e['name']}: a Secret the test does not have"
        else:
            raise AssertionError(f"unsupported env source {ref}")
    by_number = {str(k): str(v) for k, v in ports.items()}
    return {k: localize(by_number.get(v, v)) for k, v in env.items()}


def make_pod(
    workload: dict, configmaps: dict[str, dict], localize, index: int = 0, **container: object
) -> LocalPod:
    """A process pod, or with `image=` (and `mounts=`) a container pod."""
    spec = pod_spec(workload)
    c = spec["containers"][0]
    ports = {p["containerPort"]: free_port() for p in c.get("ports", [])}
    name = f"{workload['metadata']['name']}-{index}"
    env = pod_env(spec, configmaps, ports, name, localize)
    labels = dict(workload["spec"]["template"]["metadata"]["labels"])
    if container:
        return ContainerPod(name, spec, env, ports, labels, **container)  # type: ignore[arg-type]
    return LocalPod(name, spec, env, ports, labels)


def service_url(service: dict, pods: list[LocalPod], port_name: str = "http") -> str:
    """A Service's port on this host: the first selected pod's target port (named or numbered)."""
    sel = service["spec"]["selector"]
    port = next(p for p in service["spec"]["ports"] if p["name"] == port_name)
    for pod in pods:
        if sel.items() <= pod.labels.items():
            return f"http://{LOCAL}:{pod.port(port['targetPort'])}"
    raise AssertionError(f"Service {service['metadata']['name']} selects none of {[p.name for p in pods]}")
