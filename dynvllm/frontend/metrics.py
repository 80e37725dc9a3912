"""Prometheus metrics of the frontend (one registry per app, so tests can start several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LAT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class FrontendMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dynvllm_requests", "HTTP inference requests by model and status", ["model", "status"], registry=r
        )
        self.inflight = Gauge("dynvllm_inflight_requests", "Requests in progress", ["model"], registry=r)
        self.ttft = Histogram(
            "dynvllm_time_to_first_token_seconds", "Time to first token", ["model"], buckets=_LAT, registry=r
        )
        self.itl = Histogram(
            "dynvllm_inter_token_latency_seconds",
            "Time between streamed tokens",
            ["model"],
            buckets=_LAT,
            registry=r,
        )
        self.output_tokens = Counter("dynvllm_output_tokens", "Generated tokens", ["model"], registry=r)
        self.prompt_tokens = Counter("dynvllm_prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.cached_tokens = Counter(
            "dynvllm_cached_prompt_tokens", "Prompt tokens served from a prefix cache", ["model"], registry=r
        )
        self.prefill = Counter(
            "dynvllm_disagg_prefill",
            "Prefill hops by outcome (remote, skipped_short, skipped_cached, no_prefill_worker, failed, ...)",
            ["model", "outcome"],
            registry=r,
        )
        self.routed = Counter(
            "dynvllm_routed_requests", "Requests routed to each worker", ["model", "worker"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
