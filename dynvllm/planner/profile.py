"""A role's capacity per worker at the latency targets, from the profile `dynvllm profile` writes.

The profile holds, per role and per (ISL, OSL) point, a concurrency sweep on one worker: request
rate, TTFT and ITL percentiles at each level. A worker's capacity at a point is the highest
request rate of a level that met both targets (p90); between points it is interpolated
bilinearly over the (ISL, OSL) grid, clamped at the grid's edges. Pure: no I/O but `load`.

A role may name the targets it governs (`"targets"`): in a disaggregated service the prefill
workers set the time to first token and the decode workers the gaps between tokens, so a sweep
of one prefill and one decode worker gives prefill's capacity by TTFT alone and decode's by ITL
alone. Without it a role is held to both (agg).

    {"version": 1, "model": "...", "engine": "sim",
     "roles": {"agg": {"targets": ["ttft", "itl"], "points": [{"isl": 128, "osl": 32, "sweep": [
        {"concurrency": 1, "request_rate": 3.1, "ttft_p50": 0.02, "ttft_p90": 0.03,
         "itl_p50": 0.010, "itl_p90": 0.012}, ...]}, ...]}}}
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VERSION = 1
BOTH = ("ttft", "itl")


class ProfileError(ValueError):
    """The profile cannot answer: missing role, no points, a malformed file."""


@dataclass(frozen=True)
class Level:
    concurrency: int
    request_rate: float
    ttft_p50: float
    ttft_p90: float
    itl_p50: float
    itl_p90: float


@dataclass
class Point:
    isl: int
    osl: int
    sweep: list[Level] = field(default_factory=list)

    def capacity(self, ttft_target: float, itl_target: float, targets: tuple[str, ...] = BOTH) -> float:
        """Highest request rate of a level within the targets (those named in `targets`). When
        no level meets them (the targets are below what one request alone gets) more workers
        cannot help either: the lowest level's rate is used, so the planner still scales with load."""
        if not self.sweep:
            return 0.0
        ttft = ttft_target if "ttft" in targets else float("inf")
        itl = itl_target if "itl" in targets else float("inf")
        ok = [lv.request_rate for lv in self.sweep if lv.ttft_p90 <= ttft and lv.itl_p90 <= itl]
        if ok:
            return max(ok)
        return min(self.sweep, key=lambda lv: lv.concurrency).request_rate


@dataclass
class Profile:
    roles: dict[str, list[Point]]
    model: str = ""
    engine: str = ""
    targets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # by role; default BOTH

    def governs(self, role: str) -> tuple[str, ...]:
        return self.targets.get(role, BOTH)

    def capacity(self, role: str, isl: float, osl: float, ttft_target: float, itl_target: float) -> float:
        """Request rate one worker of `role` sustains at (isl, osl) within the targets."""
        points = self.roles.get(role)
        if not points:
            raise ProfileError(
                f"the profile has no points for role {role!r} (it has: {', '.join(self.roles) or 'none'}): "
                f"run `dynvllm profile --role {role}`"
            )
        caps = {(p.isl, p.osl): p.capacity(ttft_target, itl_target, self.governs(role)) for p in points}
        isls = sorted({k[0] for k in caps})
        osls = sorted({k[1] for k in caps})
        if len(caps) != len(isls) * len(osls):  # not a full grid: the nearest point answers
            near = min(caps, key=lambda k: abs(k[0] - isl) / max(isls) + abs(k[1] - osl) / max(osls))
            return caps[near]
        (i0, i1, ti), (o0, o1, to) = _bracket(isls, isl), _bracket(osls, osl)
        low = caps[(i0, o0)] * (1 - ti) + caps[(i1, o0)] * ti
        high = caps[(i0, o1)] * (1 - ti) + caps[(i1, o1)] * ti
        return low * (1 - to) + high * to

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "model": self.model,
            "engine": self.engine,
            "roles": {
                role: {
                    "targets": list(self.governs(role)),
                    "points": [
                        {"isl": p.isl, "osl": p.osl, "sweep": [lv.__dict__ for lv in p.sweep]} for p in points
                    ],
                }
                for role, points in self.roles.items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        try:
            roles = {
                role: [
                    Point(int(p["isl"]), int(p["osl"]), [Level(**lv) for lv in p["sweep"]])
                    for p in body["points"]
                ]
                for role, body in data["roles"].items()
            }
            targets = {role: tuple(body.get("targets") or BOTH) for role, body in data["roles"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProfileError(f"not a dynvllm profile ({type(exc).__name__}: {exc})") from None
        for role, names in targets.items():
            if not names or not set(names) <= set(BOTH):
                raise ProfileError(f"role {role!r}: targets are ttft and/or itl (got {list(names)})")
        return cls(roles, str(data.get("model", "")), str(data.get("engine", "")), targets)


def _bracket(values: list[int], x: float) -> tuple[int, int, float]:
    """The grid values around x and x's fraction between them (clamped to the ends)."""
    if x <= values[0]:
        return values[0], values[0], 0.0
    if x >= values[-1]:
        return values[-1], values[-1], 0.0
    hi = bisect.bisect_right(values, x)
    a, b = values[hi - 1], values[hi]
    return a, b, (x - a) / (b - a)


def load(path: Path) -> Profile:
    try:
        return Profile.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise ProfileError(f"cannot read the profile {path}: {exc}") from None
