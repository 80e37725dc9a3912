"""`--http-workers N`: N frontend processes on one port, the kernel spreading new connections
over them (SO_REUSEPORT). Each process has its own discovery view and router, fed by the same
heartbeats and KV events; metrics are summed across processes (Prometheus multiprocess files).
The parent only starts, restarts and stops them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import time

from dynvllm.envnames import SETTINGS_ENV
from dynvllm.process import terminate
from dynvllm.restarts import RestartPolicy, SlotState
from dynvllm.settings import Settings

log = logging.getLogger("dynvllm.frontend")
REUSEPORT_ENV = "DYNVLLM_REUSEPORT"
PROM_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening socket that shares its port with the other frontend processes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def process_count(value: int | str, cores: int, engines: int = 0) -> int:
    """Frontend processes for `--http-workers` (`auto`: one per 4 cores, at most 4; one below 8;
    never more than the cores left once each local engine has two).

    Why these numbers: on a 16-core GPU host one process saturates a core near 256 concurrent
    streams of a small model, and four brought first-token latency to a third of vLLM's own
    server's (docs/benchmarks.md); an engine's core loop and its worker's output handling each
    keep a core busy, and below 8 cores the engines need what is left."""
    if value != "auto":
        return int(value)
    if cores < 8:
        return 1
    return max(1, min(4, cores // 4, cores - 2 * engines))


def quota_cores(cpu_max: str | None, quota_us: str | None = None, period_us: str | None = None) -> int | None:
    """Whole cores a cgroup's CPU quota allows (v2 `cpu.max`, or v1's quota and period files);
    None when there is no quota. A container limited to 2 CPUs on a 64-core node still sees 64
    in its affinity mask: the quota is what it may use."""
    try:
        if cpu_max is not None:
            quota, period = (cpu_max.split() + ["100000"])[:2]  # "max 100000" or "200000 100000"
            if quota == "max":
                return None
            return max(1, int(quota) // int(period))
        if quota_us is not None and period_us is not None and int(quota_us) > 0:
            return max(1, int(quota_us) // int(period_us))
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def usable_cores() -> int:
    try:
        cores = len(os.sched_getaffinity(0))  # the cpuset a container or taskset gives
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = quota_cores(
        _read("/sys/fs/cgroup/cpu.max"),
        _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
        _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    )
    return min(cores, quota) if quota else cores


def run_processes(settings: Settings, n: int) -> int:
    """Start `n` frontend processes on the settings' port and keep them running."""
    from rich.console import Console

    from dynvllm.supervisor import Slot, supervise

    fe = settings.frontend
    if fe.http_port == 0:
        with socket.socket() as probe:
            probe.bind((fe.http_host, 0))
            fe.http_port = probe.getsockname()[1]
    child = settings.model_copy(deep=True)
    child.frontend.http_workers = 1
    prom_dir = tempfile.mkdtemp(prefix="dynvllm-metrics-")
    env = {**os.environ, SETTINGS_ENV: child.to_json(), REUSEPORT_ENV: "1", PROM_DIR_ENV: prom_dir}
    policy = RestartPolicy(max_restarts=settings.worker.max_restarts)
    slots = [
        Slot("frontend process", ("frontend",), state=SlotState(started_at=time.monotonic()))
        for _ in range(n)
    ]
    stopping = False

    def spawn(slot: Slot) -> None:
        slot.launch(env)

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for slot in slots:
        spawn(slot)
    console = Console(stderr=True)
    console.print(f"dynvllm frontend: {n} processes on port {fe.http_port}", highlight=False)
    code = 0
    try:
        while not stopping:
            time.sleep(0.2)
            for slot in slots:
                if slot.proc is not None and slot.proc.poll() is not None and not slot.reported:
                    _mark_dead(slot.proc.pid, prom_dir)  # its live gauges leave the sums
            for line in supervise(slots, policy, spawn, time.monotonic()):
                console.print(line, highlight=False)
            if all(slot.down_for_good for slot in slots):
                code = 1
                break
    finally:
        procs = [slot.proc for slot in slots if slot.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            terminate(proc, 70)
        import shutil

        shutil.rmtree(prom_dir, ignore_errors=True)
    return code


def _mark_dead(pid: int, prom_dir: str) -> None:
    from prometheus_client import multiprocess

    try:
        # The folder is the children's (their environment): this process does not have it set.
        multiprocess.mark_process_dead(pid, prom_dir)
    except OSError as exc:  # its files could not be removed: its gauges stay in the sums
        log.warning("metrics of the dead frontend process %d stay counted: %s", pid, exc)
