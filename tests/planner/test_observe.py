"""An interval's load from two scrapes of the frontend's metrics."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dynvllm.planner.observe import observe, parse, quantile


class Frontend:
    def __init__(self) -> None:
        r = self.r = CollectorRegistry()
        self.req = Counter("dynvllm_requests", "", ["model", "status"], registry=r)
        self.prompt = Counter("dynvllm_prompt_tokens", "", ["model"], registry=r)
        self.out = Counter("dynvllm_output_tokens", "", ["model"], registry=r)
        self.inflight = Gauge("dynvllm_inflight_requests", "", ["model"], registry=r)
        self.ttft = Histogram(
            "dynvllm_time_to_first_token_seconds", "", ["model"], buckets=(0.1, 0.2, 0.4, 1.0), registry=r
        )

    def scrape(self):
        return parse(generate_latest(self.r).decode())


def test_rates_means_and_percentiles_cover_the_interval_only():
    fe = Frontend()
    for _ in range(10):  # before the interval: slow
        fe.ttft.labels("m").observe(0.9)
    fe.req.labels("m", "200").inc(10)
    before = fe.scrape()
    fe.req.labels("m", "200").inc(18)
    fe.req.labels("m", "503").inc(2)
    fe.prompt.labels("m").inc(20 * 100)
    fe.out.labels("m").inc(20 * 30)
    fe.inflight.labels("m").set(3)
    for _ in range(20):
        fe.ttft.labels("m").observe(0.15)
    obs = observe(before, fe.scrape(), seconds=10.0, model="m", queue_depth=4)
    assert obs.requests == 20 and obs.request_rate == 2.0
    assert obs.isl == 100 and obs.osl == 30 and obs.inflight == 3 and obs.queue_depth == 4
    assert 0.1 < obs.ttft_p50 <= obs.ttft_p90 <= 0.2  # the slow ones were before the interval
    assert math.isnan(obs.itl_p90)  # no ITL histogram: unknown, not zero
    assert observe(before, fe.scrape(), 10.0, model="other").requests == 0


def test_a_restarted_frontend_counts_from_zero():
    fe = Frontend()
    fe.req.labels("m", "200").inc(100)
    before = fe.scrape()
    fresh = Frontend()
    fresh.req.labels("m", "200").inc(5)
    assert observe(before, fresh.scrape(), 5.0).request_rate == 1.0


def test_quantile_interpolates_within_a_bucket():
    cum = {0.1: 0.0, 0.2: 10.0, 0.4: 10.0, math.inf: 10.0}
    assert quantile(cum, 0.5) == pytest.approx(0.15)
    assert quantile({0.1: 0.0, math.inf: 4.0}, 0.9) == 0.1  # in +Inf: the last finite bound
    assert math.isnan(quantile({}, 0.5))


def test_prefill_share_counts_hops_that_were_not_skipped():
    fe = Frontend()
    hops = Counter("dynvllm_disagg_prefill", "", ["model", "outcome"], registry=fe.r)
    hops.labels("m", "remote").inc(5)
    before = fe.scrape()
    fe.req.labels("m", "200").inc(10)
    hops.labels("m", "remote").inc(4)
    hops.labels("m", "no_prefill_worker").inc(2)  # wanted one: counts
    hops.labels("m", "skipped_short").inc(3)
    hops.labels("m", "skipped_cached").inc(1)
    obs = observe(before, fe.scrape(), 10.0)
    assert (obs.requests, obs.prefill_requests) == (10, 6)


def test_the_admission_queue_is_read_at_the_intervals_end():
    fe = Frontend()
    queued = Gauge("dynvllm_admission_queue_length", "", ["model"], registry=fe.r)
    before = fe.scrape()
    queued.labels("m").set(7)
    queued.labels("other").set(2)
    assert observe(before, fe.scrape(), 10.0).admission_queue == 9
    assert observe(before, fe.scrape(), 10.0, model="m").admission_queue == 7
