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
    planner_react_interval: float = Field(
        1.0,
        ge=0,
        description="Seconds between looks at the requests held in the frontend and the engines' "
        "queues between two intervals: when they would wait beyond half the TTFT target (or no "
        "worker serves), workers are added at once rather than at the interval's end (0: off).",
    )
    predictor: str = Field(
        "moving-average",
        description="How the next interval's load is predicted: constant, moving-average, holt-winters "
        "(entry-point group dynvllm.planner_predictors).",
    )
    predictor_window: int = Field(
        6, ge=1, description="Intervals the moving average spans; the seasonal predictor's season length."
    )
    planner_lookahead: float = Field(
        0.0,
        ge=0,
        description="Seconds ahead the load is predicted for (set it to a worker's start-up time): a "
        "predictor with a trend (holt-winters) asks for a ramp's workers that much earlier; the "
        "larger of this and the next interval's prediction is used.",
    )
    planner_noise_band: float = Field(
        1.0,
        ge=0,
        description="Standard deviations of a measured request rate (counted arrivals: Poisson) by "
        "which the load must exceed the present workers' capacity before a worker is added; held "
        "requests count in the load in full, so a queue that builds still adds one (0: off).",
    )
    min_workers: int = Field(1, ge=0, description="Fewest workers per role (0 allows scaling to zero).")
    max_workers: int = Field(8, ge=1, description="Most workers per role.")
    cooldown: float = Field(
        30.0,
        ge=0,
        description="Seconds after a change before a scale-down (scale-ups do not wait: workers "
        "still starting count, so none is asked for twice).",
    )
    scale_down_after: int = Field(
        3,
        ge=1,
        description="Intervals the load must stay below the lower threshold before a scale-down (not "
        "waited for when the predictor, holt-winters, expects the load that far ahead to fit as well).",
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
    k8s_namespace: str | None = Field(
        None,
        description="kubernetes connector: namespace of the workers' Deployments (default: the planner "
        "pod's own, else the kubeconfig context's, else default).",
    )
    k8s_deployments: str | None = Field(
        None,
        description="kubernetes connector: Deployment of each role, as role=name pairs separated by "
        "commas (default: dynvllm-worker for agg, dynvllm-worker-ROLE for others, as in deploy/k8s).",
    )
    k8s_kubeconfig: Path | None = Field(
        None,
        description="kubernetes connector: kubeconfig file (default: the in-cluster service account "
        "inside a pod, else $KUBECONFIG or ~/.kube/config).",
    )
    planner_metrics_port: int = Field(
        0, ge=-1, le=65535, description="Port of the planner's Prometheus endpoint (0: a free one; -1: off)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> PlannerSettings:
        if self.min_workers > self.max_workers:
            raise ValueError(f"--min-workers {self.min_workers} is above --max-workers {self.max_workers}")
        for pair in (self.k8s_deployments or "").split(","):
            if pair.strip() and not all(part.strip() for part in pair.partition("=")[::2]):
                raise ValueError(f"--k8s-deployments takes role=deployment pairs (got {pair.strip()!r})")
        return self

    def deployment(self, role: str) -> str:
        """The Deployment that runs the role's workers (kubernetes connector)."""
        for pair in (self.k8s_deployments or "").split(","):
            name, _, deployment = pair.partition("=")
            if name.strip() == role and deployment.strip():
                return deployment.strip()
        return "dynvllm-worker" if role == "agg" else f"dynvllm-worker-{role}"

    def role_list(self) -> list[str] | None:
        if not self.planner_roles:
            return None
        return [r.strip() for r in self.planner_roles.split(",") if r.strip()]
