"""`--http-workers N`: N frontend processes on one port, the kernel spreading new connections
over them (SO_REUSEPORT). Each process has its own discovery view and router, fed by the same
heartbeats and KV events; metrics are summed across processes (Prometheus multiprocess files).
The parent only starts, restarts and stops them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from dynvllm.child import SETTINGS_ENV
from dynvllm.process import child_preexec, terminate
from dynvllm.restarts import RestartPolicy, SlotState
from dynvllm.settings import Settings

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


def run_processes(settings: Settings) -> int:
    fe = settings.frontend
    n = fe.http_workers
    if fe.http_port == 0:
        with socket.socket() as probe:
            probe.bind((fe.http_host, 0))
            fe.http_port = probe.getsockname()[1]
    child = settings.model_copy(deep=True)
    child.frontend.http_workers = 1
    prom_dir = tempfile.mkdtemp(prefix="dynvllm-metrics-")
    env = {**os.environ, SETTINGS_ENV: child.to_json(), REUSEPORT_ENV: "1", PROM_DIR_ENV: prom_dir}
    policy = RestartPolicy(max_restarts=settings.worker.max_restarts)
    slots: list[tuple[SlotState, subprocess.Popen]] = []
    stopping = False

    def spawn() -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "dynvllm.child", "frontend"], env=env, preexec_fn=child_preexec
        )

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for _ in range(n):
        slots.append((SlotState(started_at=time.monotonic()), spawn()))
    print(f"dynvllm frontend: {n} processes on port {fe.http_port}", file=sys.stderr, flush=True)
    code = 0
    try:
        while not stopping:
            time.sleep(0.2)
            now = time.monotonic()
            for i, (slot, proc) in enumerate(slots):
                if proc.poll() is not None and slot.restart_at is None and not slot.given_up:
                    _mark_dead(proc.pid)
                    if slot.on_exit(policy, proc.returncode, now) != "restart":
                        print(f"frontend process {proc.pid} exited ({proc.returncode})", file=sys.stderr)
                if slot.due(now):
                    slot.restarted(now)
                    slots[i] = (slot, spawn())
            if all(p.poll() is not None and (s.given_up or s.restart_at is None) for s, p in slots):
                code = 1
                break
    finally:
        for _, proc in slots:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in slots:
            terminate(proc, 70)
        import shutil

        shutil.rmtree(prom_dir, ignore_errors=True)
    return code


def _mark_dead(pid: int) -> None:
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
    except Exception:  # no metrics written yet
        pass
