"""The planner's settings group (`dynvllm planner`, `dynvllm profile`): a pure pydantic module."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from dynvllm.settings_base import SettingsGroup


class PlannerSettings(SettingsGroup):
    title: ClassVar[str] = "Planner"
    planner_profile: Path | None = Field(
        None, description="Profile JSON written by `dynvllm profile`: each role's capacity per worker."
    )
    planner_roles: str | None = Field(
        None, description="Roles the planner scales, comma-separated (default: every role of the profile)."
    )
    planner_model: str | None = Field(
        None, description="Served model whose load the planner reads (default: all the frontend's models)."
    )
    frontend_url: str | None = Field(
        None,
        description="Base URL of the frontend whose /metrics the planner reads "
        "(default: the one `serve` recorded for the namespace).",
    )
    ttft_target: float = Field(0.5, gt=0, description="Time-to-first-token target (p90), in seconds.")
    itl_target: float = Field(0.05, gt=0, description="Inter-token-latency target (p90), in seconds.")
    planner_interval: float = Field(10.0, gt=0, description="Seconds between observations and decisions.")
    predictor: str = Field(
        "moving-average",
        description="How the next interval's load is predicted: constant, moving-average, holt-winters "
        "(entry-point group dynvllm.planner_predictors).",
    )
    predictor_window: int = Field(
        6, ge=1, description="Intervals the moving average spans; the seasonal predictor's season length."
    )
    min_workers: int = Field(1, ge=0, description="Fewest workers per role (0 allows scaling to zero).")
    max_workers: int = Field(8, ge=1, description="Most workers per role.")
    cooldown: float = Field(
        30.0,
        ge=0,
        description="Seconds after a change before the next one (a waiting request at zero "
        "workers does not wait for it).",
    )
    scale_down_after: int = Field(
        3, ge=1, description="Intervals the load must stay below the lower threshold before a scale-down."
    )
    scale_down_threshold: float = Field(
        0.7,
        gt=0,
        le=1,
        description="Scale down only to a count whose capacity times this still carries the load "
        "(hysteresis against flapping).",
    )
    idle_after: float = Field(
        0.0,
        ge=0,
        description="With --min-workers 0: seconds without requests after which a role loses its last "
        "worker (0: never).",
    )
    planner_connector: str = Field(
        "local",
        description="How decisions are carried out (entry-point group dynvllm.planner_connectors): "
        "local asks the `serve` supervisor of the namespace.",
    )
    planner_metrics_port: int = Field(
        0, ge=-1, le=65535, description="Port of the planner's Prometheus endpoint (0: a free one; -1: off)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> PlannerSettings:
        if self.min_workers > self.max_workers:
            raise ValueError(f"--min-workers {self.min_workers} is above --max-workers {self.max_workers}")
        return self

    def role_list(self) -> list[str] | None:
        if not self.planner_roles:
            return None
        return [r.strip() for r in self.planner_roles.split(",") if r.strip()]
