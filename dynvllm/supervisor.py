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
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

from dynvllm import cores
from dynvllm.envnames import RESTARTS_ENV, SETTINGS_ENV
from dynvllm.process import child_preexec, terminate
from dynvllm.restarts import RestartPolicy, SlotState
from dynvllm.runtime import state
from dynvllm.runtime.nats import EmbeddedNats
from dynvllm.settings import Settings
from dynvllm.supervisor_control import ControlServer, ScaleRequest

log = logging.getLogger("dynvllm.serve")
#: Lines of a child's output kept to show when it fails.
TAIL_LINES = 20


def exit_text(code: int) -> str:
    """'exited with code 1' or 'was killed by SIGKILL' (Popen's negative return codes)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _relay(source: IO[bytes], target: IO[str], tail: deque[str]) -> None:
    """Copy a child's output to ours as it comes, keeping its last lines."""
    out = getattr(target, "buffer", None)
    for line in iter(source.readline, b""):
        tail.append(line.decode(errors="replace").rstrip())
        try:
            if out is not None:
                out.write(line)
                out.flush()
            else:
                target.write(line.decode(errors="replace"))
        except (OSError, ValueError):  # our own output is closed: keep reading, or the child blocks
            pass
    source.close()


@dataclass
class Slot:
    name: str  # "frontend" or the worker's role
    args: tuple[str, ...]
    proc: subprocess.Popen | None = None
    state: SlotState = field(default_factory=SlotState)
    reported: bool = False
    draining: bool = False  # asked to leave (scaled down): not restarted, dropped once it exits
    #: The last lines the current process printed (stdout and stderr), for failure reports.
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    relays: list[threading.Thread] = field(default_factory=list)
    #: This worker's own settings, where they differ from the service's (a fixed metrics port).
    settings: Settings | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def down_for_good(self) -> bool:
        return not self.alive and self.state.restart_at is None and (self.reported or self.proc is None)

    def launch(self, env: dict[str, str]) -> None:
        """Start (or restart) the child: `python -m dynvllm.child ARGS`, told its restart count.
        Its output goes on to ours through pipes, so its last lines can be shown if it fails."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dynvllm.child", *self.args],
            env={**env, RESTARTS_ENV: str(self.state.restarts)},
            preexec_fn=child_preexec,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.tail = deque(maxlen=TAIL_LINES)
        self.relays = []
        for source, target in ((self.proc.stdout, sys.stdout), (self.proc.stderr, sys.stderr)):
            assert source is not None
            relay = threading.Thread(target=_relay, args=(source, target, self.tail), daemon=True)
            relay.start()
            self.relays.append(relay)
        self.reported = False

    def failure(self) -> str:
        """What became of a child that stopped: its name, pid, exit code or signal, last lines."""
        assert self.proc is not None and self.proc.returncode is not None
        # The relays may still hold the last lines (an engine process of the child may even keep
        # the pipes open): a moment for them to arrive.
        for relay in self.relays:
            relay.join(0.5)
        lines = "".join(f"\n  | {line}" for line in self.tail)
        head = f"{self.name} (pid {self.proc.pid}) {exit_text(self.proc.returncode)}"
        return head + (f"; its last lines:{lines}" if lines else "; it printed nothing")


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
            what = f"{slot.name} (pid {slot.proc.pid}) {exit_text(code)}"
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
        slot.launch({**os.environ, SETTINGS_ENV: (slot.settings or self.settings).to_json()})

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
            self.frontend = Slot(
                "frontend", ("frontend",), state=SlotState(started_at=now), settings=self._frontend_settings()
            )
            self._spawn(self.frontend)
        for role, count in self.roles:
            for _ in range(count):
                self._add_worker(role, now)
        self.control = ControlServer(rt)
        self.control.start()

    def _frontend_settings(self) -> Settings | None:
        """`--http-workers auto` sized here, where the engines this service starts on the same
        host are known: the frontend leaves them their cores."""
        if self.settings.frontend.http_workers != "auto":
            return None
        engines = sum(n for _, n in self.roles) * (self.settings.engine.tensor_parallel_size or 1)
        own = self.settings.model_copy(deep=True)
        own.frontend.http_workers = cores.process_count("auto", cores.usable_cores(), engines)
        return own

    def _add_worker(self, role: str, now: float) -> Slot:
        slot = Slot(role, ("worker", role), state=SlotState(started_at=now))
        base = self.settings.worker.metrics_port
        if base > 0:
            # Fixed ports, for scrape configs: the lowest N+k no other worker of ours holds; a
            # restarted worker keeps its slot's.
            held = {s.settings.worker.metrics_port for s in self.workers if s.settings is not None}
            port = next(p for p in range(base, base + len(self.workers) + 1) if p not in held)
            if port > 65535:
                raise ValueError(f"--metrics-port {base}: worker {port - base + 1} would need port {port}")
            slot.settings = self.settings.model_copy(deep=True)
            slot.settings.worker.metrics_port = port
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

    def startup_failure(self) -> str:
        """Why `wait_ready` gave up: each child that died during start-up, with its last lines."""
        dead = [s.failure() for s in self.slots() if s.proc is not None and s.proc.poll() is not None]
        return "\n".join(dead) or "the service was not ready within the start-up timeout"

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
        # A stopping service takes no more commands: its record goes first, so a service started
        # meanwhile in the same namespace is the only one a command finds.
        state.forget(self.settings.runtime.namespace)
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
