"""`dynvllm serve`: start NATS (unless joining one), the frontend and workers; keep them running;
stop them all.

Children get PDEATHSIG so they die with us even if we are killed; each worker also guards its
own engine processes. A child that crashes after start-up is restarted with back-off
(`RestartPolicy`); one that exits cleanly (drained on request) stays down. Shutdown order keeps
streams whole: workers drain first, then the frontend stops, then the private NATS server.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from dynvllm.envnames import RESTARTS_ENV, SETTINGS_ENV
from dynvllm.process import child_preexec, terminate
from dynvllm.restarts import RestartPolicy, SlotState
from dynvllm.runtime import state
from dynvllm.runtime.nats import EmbeddedNats
from dynvllm.settings import Settings
from dynvllm.supervisor_control import ControlServer, ScaleRequest

log = logging.getLogger("dynvllm.serve")


@dataclass
class Slot:
    name: str  # "frontend" or the worker's role
    args: tuple[str, ...]
    proc: subprocess.Popen | None = None
    state: SlotState = field(default_factory=SlotState)
    reported: bool = False
    draining: bool = False  # asked to leave (scaled down): not restarted, dropped once it exits

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def down_for_good(self) -> bool:
        return not self.alive and self.state.restart_at is None and (self.reported or self.proc is None)

    def launch(self, env: dict[str, str]) -> None:
        """Start (or restart) the child: `python -m dynvllm.child ARGS`, told its restart count."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dynvllm.child", *self.args],
            env={**env, RESTARTS_ENV: str(self.state.restarts)},
            preexec_fn=child_preexec,
        )
        self.reported = False


def supervise(
    slots: list[Slot], policy: RestartPolicy, spawn: Callable[[Slot], None], now: float
) -> list[str]:
    """One supervision round over `slots`: notice exits, restart what is due (through `spawn`).
    Returns console lines (rich markup)."""
    lines = []
    for slot in slots:
        if slot.proc is None:
            continue
        code = slot.proc.poll()
        if code is not None and not slot.reported:
            slot.reported = True
            what = f"{slot.name} (pid {slot.proc.pid}) exited with code {code}"
            decision = slot.state.on_exit(policy, code, now)
            if decision == "restart":
                restart_at = slot.state.restart_at
                assert restart_at is not None  # on_exit sets it when it decides to restart
                wait = restart_at - now
                lines.append(
                    f"[yellow]{what}; restarting in {wait:.0f} s "
                    f"(restart {slot.state.restarts + 1} of {policy.max_restarts})[/]"
                )
            elif decision == "done":
                lines.append(f"[yellow]{what} after draining; not restarted[/]")
            else:
                lines.append(f"[bold red]{what}; restart limit reached, leaving it down[/]")
        if slot.state.due(now):
            slot.state.restarted(now)
            spawn(slot)
            lines.append(f"[green]{slot.name} restarted as pid {slot.proc.pid}[/]")
    return lines


@dataclass
class Service:
    settings: Settings
    roles: list[tuple[str, int]]  # (role, how many workers)
    with_frontend: bool = True
    nats: EmbeddedNats | None = None
    frontend: Slot | None = None
    workers: list[Slot] = field(default_factory=list)
    stop_requested: bool = False
    policy: RestartPolicy = field(init=False)
    control: ControlServer | None = None

    def __post_init__(self) -> None:
        self.policy = RestartPolicy(max_restarts=self.settings.worker.max_restarts)

    def _spawn(self, slot: Slot) -> None:
        slot.launch({**os.environ, SETTINGS_ENV: self.settings.to_json()})

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
        now = time.monotonic()
        if self.with_frontend:
            self.frontend = Slot("frontend", ("frontend",), state=SlotState(started_at=now))
            self._spawn(self.frontend)
        for role, count in self.roles:
            for _ in range(count):
                self._add_worker(role, now)
        self.control = ControlServer(rt)
        self.control.start()

    def _add_worker(self, role: str, now: float) -> Slot:
        slot = Slot(role, ("worker", role), state=SlotState(started_at=now))
        self._spawn(slot)
        self.workers.append(slot)
        return slot

    def scale(self, req: ScaleRequest) -> dict:
        """Start workers of a role, or drain some (SIGTERM: they finish their requests and exit),
        until `req.count` serve or start; `req.drain` pids leave first, then the youngest."""
        from dynvllm import registry

        if req.role not in registry.names(registry.ROLES):
            raise ValueError(f"no role {req.role!r}; installed: {', '.join(registry.names(registry.ROLES))}")
        mine = [s for s in self.workers if s.name == req.role and not s.draining and not s.down_for_good]
        started, drained = [], []
        now = time.monotonic()
        for _ in range(req.count - len(mine)):
            started.append(self._add_worker(req.role, now).proc.pid)  # type: ignore[union-attr]
        if req.count < len(mine):
            order = sorted(
                mine, key=lambda s: (s.proc is None or s.proc.pid not in req.drain, -s.state.started_at)
            )
            for slot in order[: len(mine) - req.count]:
                slot.draining = True
                if slot.alive and slot.proc is not None:
                    slot.proc.send_signal(signal.SIGTERM)
                    drained.append(slot.proc.pid)
        return {"role": req.role, "count": req.count, "started": started, "draining": drained}

    def worker_pids(self) -> dict:
        serving: dict[str, list[int]] = {}
        for s in self.workers:
            if s.alive and s.proc is not None and not s.draining:
                serving.setdefault(s.name, []).append(s.proc.pid)
        draining = [s.proc.pid for s in self.workers if s.draining and s.alive and s.proc is not None]
        return {"workers": serving, "draining": draining}

    def _answer_control(self) -> list[str]:
        lines = []
        for request, future in self.control.pending() if self.control else []:
            try:
                if isinstance(request, ScaleRequest):
                    answer = self.scale(request)
                    if answer["started"] or answer["draining"]:
                        lines.append(
                            f"[cyan]scaling {request.role} to {request.count}: started "
                            f"{answer['started'] or 'none'}, draining {answer['draining'] or 'none'}[/]"
                        )
                else:
                    answer = self.worker_pids()
                future.set_result(answer)
            except Exception as exc:  # answered, so the caller learns it instead of timing out
                future.set_result({"error": str(exc) if isinstance(exc, ValueError) else repr(exc)})
        return lines

    def slots(self) -> list[Slot]:
        return ([self.frontend] if self.frontend else []) + self.workers

    def http_url(self) -> str:
        fe = self.settings.frontend
        host = "127.0.0.1" if fe.http_host in ("0.0.0.0", "::") else fe.http_host
        return f"{'https' if fe.ssl_certfile else 'http'}://{host}:{fe.http_port}"

    def wait_ready(self, timeout: float = 600) -> bool:
        """True once the frontend reports every worker healthy; False if a child died first."""
        deadline = time.monotonic() + timeout
        want = len(self.workers)
        while time.monotonic() < deadline and not self.stop_requested:
            if any(not s.alive for s in self.slots()):
                return False
            if not self.with_frontend:
                return True
            url = self.http_url() + "/health"
            # Our own frontend on loopback: its certificate need not name this address.
            tls = ssl._create_unverified_context() if url.startswith("https") else None
            try:
                with urllib.request.urlopen(url, timeout=1, context=tls) as r:
                    if json.load(r).get("workers", 0) >= want:
                        return True
            # Not listening yet, a 503 while workers start, a connection cut while it starts up.
            except (OSError, ValueError, http.client.HTTPException) as exc:
                log.debug("frontend at %s not ready yet: %s", url, exc)
            time.sleep(0.3)
        return False

    def supervise(self) -> list[str]:
        """One supervision round over the frontend and workers (see `supervise`), then the
        control requests; drained workers that exited are dropped."""
        active = [s for s in self.slots() if not s.draining]
        lines = supervise(active, self.policy, self._spawn, time.monotonic())
        for s in self.workers:
            if s.draining and not s.alive and s.proc is not None:
                lines.append(f"[yellow]{s.name} (pid {s.proc.pid}) drained and left[/]")
        self.workers = [s for s in self.workers if s.alive or not s.draining]
        return lines + self._answer_control()

    def fatal(self) -> bool:
        """The service cannot serve any more: its frontend or every worker is down for good."""
        frontend_gone = self.frontend is not None and self.frontend.down_for_good
        # No worker at all is a role scaled to zero on request, not a failure.
        return frontend_gone or (bool(self.workers) and all(s.down_for_good for s in self.workers))

    def stop(self) -> None:
        if self.control is not None:
            self.control.stop()
        grace = self.settings.worker.drain_timeout + 15
        workers = [s.proc for s in self.workers if s.proc is not None]
        # SIGTERM to each worker process only: it drains and shuts its own engine down; the
        # engine processes in its group must not get the signal before it has done so.
        for p in workers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in workers:
            terminate(p, grace)
        if self.frontend is not None and self.frontend.proc is not None:
            terminate(self.frontend.proc, 10)
        if self.nats is not None:
            self.nats.stop()
        state.forget(self.settings.runtime.namespace)
