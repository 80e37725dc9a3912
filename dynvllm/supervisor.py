"""`dynvllm serve`: start NATS (unless joining one), the frontend and workers; stop them all.

Children get PDEATHSIG so they die with us even if we are killed; each worker also guards its
own engine processes. Shutdown order keeps streams whole: workers drain first, then the
frontend stops, then the private NATS server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from dynvllm.child import SETTINGS_ENV
from dynvllm.process import child_preexec, terminate
from dynvllm.runtime import state
from dynvllm.runtime.nats import EmbeddedNats
from dynvllm.settings import Settings


@dataclass
class Service:
    settings: Settings
    roles: list[tuple[str, int]]  # (role, how many workers)
    with_frontend: bool = True
    nats: EmbeddedNats | None = None
    frontend: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    stop_requested: bool = False

    def _spawn(self, *args: str) -> subprocess.Popen:
        env = dict(os.environ)
        env[SETTINGS_ENV] = self.settings.to_json()
        return subprocess.Popen(
            [sys.executable, "-m", "dynvllm.child", *args], env=env, preexec_fn=child_preexec
        )

    def start(self) -> None:
        rt = self.settings.runtime
        if not rt.nats_url:
            self.nats = EmbeddedNats()
            rt.nats_url = self.nats.start()
        if self.with_frontend and self.settings.frontend.http_port == 0:
            import socket

            with socket.socket() as sock:
                sock.bind((self.settings.frontend.http_host, 0))
                self.settings.frontend.http_port = sock.getsockname()[1]
        state.record(
            rt.namespace,
            nats_url=rt.nats_url,
            http_port=self.settings.frontend.http_port if self.with_frontend else None,
        )
        if self.with_frontend:
            self.frontend = self._spawn("frontend")
        for role, count in self.roles:
            for _ in range(count):
                self.workers.append(self._spawn("worker", role))

    def http_url(self) -> str:
        fe = self.settings.frontend
        host = "127.0.0.1" if fe.http_host in ("0.0.0.0", "::") else fe.http_host
        return f"http://{host}:{fe.http_port}"

    def wait_ready(self, timeout: float = 600) -> bool:
        """True once the frontend reports every worker healthy; False if a child died first."""
        import json

        deadline = time.monotonic() + timeout
        want = len(self.workers)
        while time.monotonic() < deadline and not self.stop_requested:
            if self.dead_child():
                return False
            if not self.with_frontend:
                return True
            try:
                with urllib.request.urlopen(self.http_url() + "/health", timeout=1) as r:
                    if json.load(r).get("workers", 0) >= want:
                        return True
            except Exception:
                pass
            time.sleep(0.3)
        return False

    def dead_workers(self) -> list[subprocess.Popen]:
        return [p for p in self.workers if p.poll() is not None]

    def fatal(self) -> bool:
        """The service cannot serve any more: its frontend or all of its workers are gone."""
        frontend_dead = self.frontend is not None and self.frontend.poll() is not None
        return frontend_dead or len(self.dead_workers()) == len(self.workers)

    def dead_child(self) -> subprocess.Popen | None:
        for p in [self.frontend, *self.workers]:
            if p is not None and p.poll() is not None:
                return p
        return None

    def stop(self) -> None:
        grace = self.settings.worker.drain_timeout + 15
        # SIGTERM to each worker process only: it drains and shuts its own engine down; the
        # engine processes in its group must not get the signal before it has done so.
        for p in self.workers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.workers:
            terminate(p, grace)
        if self.frontend is not None:
            terminate(self.frontend, 10)
        if self.nats is not None:
            self.nats.stop()
        state.forget(self.settings.runtime.namespace)
