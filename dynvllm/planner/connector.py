"""What carries a scaling decision out (entry-point group `dynvllm.planner_connectors`).

A connector is built as `Factory(settings, nc)` (nc: the planner's NATS connection) and asked,
per role, how many workers it runs (started ones included, before they register) and to apply
a decision. It never kills: workers named in `drain` finish their in-flight requests first.
"""

from __future__ import annotations

from typing import Any, Protocol

from dynvllm.planner.decide import Decision


class Connector(Protocol):
    async def workers(self, role: str) -> int | None:
        """Workers of the role it runs, started or serving, draining ones left out (None: unknown)."""

    async def apply(self, decision: Decision, instances: dict[str, Any]) -> None:
        """Start `decision.start` workers, or drain `decision.drain` (instance ids; `instances`
        maps them to their discovery records: `pid`, `host`). Raises ConnectorError when that
        cannot be done."""


class ConnectorError(RuntimeError):
    """The decision could not be carried out; the message says why."""
