"""When `serve` restarts a crashed child: exponential back-off, a limit, and forgiveness after a
long healthy run. Pure: the supervisor feeds it exits and clock readings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RestartPolicy:
    max_restarts: int = 5
    first_delay: float = 1.0
    max_delay: float = 30.0
    #: A child that served this long before crashing starts its count afresh.
    stable_after: float = 600.0

    def delay(self, restarts: int) -> float:
        return min(self.first_delay * 2**restarts, self.max_delay)


@dataclass
class SlotState:
    """One supervised child position (the frontend, or one worker of a role)."""

    restarts: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    given_up: bool = False

    def on_exit(self, policy: RestartPolicy, returncode: int, now: float) -> str:
        """Decide what happens after the child exited: 'restart' (at `restart_at`), 'done' (a clean,
        requested exit: code 0 after draining), or 'give-up' (restart limit reached)."""
        if returncode == 0:
            return "done"
        if now - self.started_at >= policy.stable_after:
            self.restarts = 0
        if self.restarts >= policy.max_restarts:
            self.given_up = True
            return "give-up"
        self.restart_at = now + policy.delay(self.restarts)
        return "restart"

    def due(self, now: float) -> bool:
        return self.restart_at is not None and now >= self.restart_at

    def restarted(self, now: float) -> None:
        self.restarts += 1
        self.started_at = now
        self.restart_at = None
