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
