"""The `local` planner connector: asks the `serve` supervisor of the namespace (its control
endpoint on NATS, see `dynvllm.supervisor_control`) to start workers of a role or drain some."""

from __future__ import annotations

from typing import Any

import msgpack

from dynvllm.planner.connector import ConnectorError
from dynvllm.planner.decide import Decision
from dynvllm.settings import Settings
from dynvllm.supervisor_control import subject


class LocalConnector:
    def __init__(self, settings: Settings, nc: Any) -> None:
        self.nc = nc
        self.subject = subject(settings.runtime.namespace)
        token = settings.runtime.admin_token
        self.token = token.get_secret_value() if token else None

    async def _call(self, payload: dict) -> dict:
        try:
            msg = await self.nc.request(
                self.subject, msgpack.packb({**payload, "admin_token": self.token}), 15
            )
        except Exception as exc:  # no supervisor answers: nothing to scale with
            raise ConnectorError(
                f"no `dynvllm serve` answers on {self.subject} ({type(exc).__name__}); the local connector "
                "scales a service that `serve` started in the same namespace"
            ) from None
        answer = msgpack.unpackb(msg.data, raw=False)
        if "error" in answer:
            raise ConnectorError(f"the supervisor refused: {answer['error']}")
        return answer

    async def workers(self, role: str) -> int | None:
        answer = await self._call({"op": "workers"})
        return len(answer["workers"].get(role, []))

    async def apply(self, decision: Decision, instances: dict[str, Any]) -> None:
        missing = [i for i in decision.drain if i not in instances or not instances[i].pid]
        if missing:
            raise ConnectorError(f"no process id known for worker(s) {', '.join(missing)}")
        await self._call(
            {
                "op": "scale",
                "role": decision.role,
                "count": decision.target,
                "drain": [instances[i].pid for i in decision.drain],
            }
        )
