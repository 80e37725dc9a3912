"""One interval's load, from two scrapes of the frontend's Prometheus metrics. Pure.

Rates and means come from counter differences, percentiles from the difference of the latency
histograms' buckets (so they describe this interval, not the process's life). A counter that
went down means the frontend restarted: its current value is this interval's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "dynvllm_requests_total"
PROMPT_TOKENS = "dynvllm_prompt_tokens_total"
OUTPUT_TOKENS = "dynvllm_output_tokens_total"
INFLIGHT = "dynvllm_inflight_requests"
TTFT = "dynvllm_time_to_first_token_seconds"
ITL = "dynvllm_inter_token_latency_seconds"
# Requests a frontend holds for a known model that has no ready worker (a scale from zero).
WAITING = "dynvllm_requests_waiting_for_worker"
# Requests the frontend's admission queue holds for a worker slot (--max-inflight-per-worker).
ADMISSION = "dynvllm_admission_queue_length"
# The prefill stage's decisions by outcome; those not skipped_* wanted a prefill worker.
PREFILL_HOPS = "dynvllm_disagg_prefill_total"

Sample = tuple[str, dict[str, str], float]


@dataclass(frozen=True)
class Observation:
    """The service's load over one interval; queue_depth is the workers' waiting requests and
    waiting_for_worker the frontend's requests held for a worker, both at the interval's end."""

    seconds: float
    requests: float = 0.0  # requests that ended (their status is counted at the end)
    request_rate: float = 0.0
    # Requests that arrived: those that ended plus the change of those in the frontend (in
    # flight, held for a worker or a slot). It leads the ended ones by a request's duration and
    # its wait (a burst shows in it before any of it is answered).
    arrival_rate: float = 0.0
    isl: float = 0.0
    osl: float = 0.0
    inflight: float = 0.0
    queue_depth: float = 0.0
    waiting_for_worker: float = 0.0
    admission_queue: float = 0.0
    prefill_requests: float = 0.0  # requests that went, or wanted to go, to a prefill worker
    ttft_p50: float = math.nan
    ttft_p90: float = math.nan
    itl_p50: float = math.nan
    itl_p90: float = math.nan


def parse(text: str) -> list[Sample]:
    return [
        (s.name, dict(s.labels), float(s.value))
        for f in text_string_to_metric_families(text)
        for s in f.samples
    ]


def total(samples: list[Sample], name: str, model: str | None = None) -> float:
    return sum(v for n, lab, v in samples if n == name and (model is None or lab.get("model") == model))


def buckets(samples: list[Sample], name: str, model: str | None = None) -> dict[float, float]:
    """Cumulative counts by upper bound, summed over models (or of one)."""
    out: dict[float, float] = {}
    for n, lab, v in samples:
        if n == name + "_bucket" and (model is None or lab.get("model") == model):
            le = float(lab["le"])
            out[le] = out.get(le, 0.0) + v
    return out


def quantile(cumulative: dict[float, float], q: float) -> float:
    """Histogram quantile as Prometheus's histogram_quantile computes it: linear within the
    bucket that holds the rank; the last finite bound when the rank falls in +Inf; NaN if empty."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return math.nan
    rank = q * cumulative[bounds[-1]]
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        c = cumulative[b]
        if c >= rank:
            if math.isinf(b):
                return prev_bound
            if c == prev_count:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (c - prev_count)
        prev_bound, prev_count = b, c
    return prev_bound


def prefill_wanted(samples: list[Sample], model: str | None = None) -> float:
    return sum(
        v
        for n, lab, v in samples
        if n == PREFILL_HOPS
        and not lab.get("outcome", "").startswith("skipped")
        and (model is None or lab.get("model") == model)
    )


def _delta(now: float, before: float) -> float:
    return now - before if now >= before else now


def observe(
    before: list[Sample],
    now: list[Sample],
    seconds: float,
    model: str | None = None,
    queue_depth: float = 0.0,
) -> Observation:
    requests = _delta(total(now, REQUESTS, model), total(before, REQUESTS, model))
    prompt = _delta(total(now, PROMPT_TOKENS, model), total(before, PROMPT_TOKENS, model))
    output = _delta(total(now, OUTPUT_TOKENS, model), total(before, OUTPUT_TOKENS, model))

    def window(name: str) -> dict[float, float]:
        b0, b1 = buckets(before, name, model), buckets(now, name, model)
        reset = any(b1.get(k, 0.0) < v for k, v in b0.items())
        return b1 if reset else {k: v - b0.get(k, 0.0) for k, v in b1.items()}

    ttft, itl = window(TTFT), window(ITL)

    def present(samples: list[Sample]) -> float:
        return sum(total(samples, name, model) for name in (INFLIGHT, WAITING, ADMISSION))

    inflight = total(now, INFLIGHT, model)
    arrived = max(0.0, requests + present(now) - present(before))
    return Observation(
        seconds=seconds,
        requests=requests,
        request_rate=requests / seconds if seconds > 0 else 0.0,
        arrival_rate=arrived / seconds if seconds > 0 else 0.0,
        isl=prompt / requests if requests else 0.0,
        osl=output / requests if requests else 0.0,
        inflight=inflight,
        queue_depth=queue_depth,
        waiting_for_worker=total(now, WAITING, model),
        admission_queue=total(now, ADMISSION, model),
        prefill_requests=_delta(prefill_wanted(now, model), prefill_wanted(before, model)),
        ttft_p50=quantile(ttft, 0.5),
        ttft_p90=quantile(ttft, 0.9),
        itl_p50=quantile(itl, 0.5),
        itl_p90=quantile(itl, 0.9),
    )
