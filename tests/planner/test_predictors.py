"""Predictors on synthetic series: steady, ramp, seasonal."""

from __future__ import annotations

import math

import pytest

from dynvllm.planner.predictors import Constant, HoltWinters, MovingAverage


def feed(pred, values):
    for v in values:
        pred.observe(v)
    return pred.predict()


def test_nothing_observed_predicts_zero():
    assert Constant().predict() == MovingAverage(3).predict() == HoltWinters(4).predict() == 0.0


def test_constant_repeats_the_last_interval():
    assert feed(Constant(), [1.0, 5.0, 2.0]) == 2.0


def test_moving_average_spans_its_window():
    assert feed(MovingAverage(3), [100.0, 1.0, 2.0, 3.0]) == pytest.approx(2.0)


def test_holt_winters_follows_a_ramp_ahead_of_the_average():
    ramp = [float(i) for i in range(1, 11)]  # next is 11
    hw = feed(HoltWinters(window=1), ramp)
    ma = feed(MovingAverage(4), ramp)
    assert abs(hw - 11) < 1.0 and ma < 9.0


def test_holt_winters_learns_a_season():
    period = 6
    shape = [10.0, 20.0, 40.0, 40.0, 20.0, 10.0]
    series = [shape[i % period] for i in range(5 * period)]
    hw = HoltWinters(window=period)
    errors = []
    for v in series:
        errors.append(abs(hw.predict() - v))
        hw.observe(v)
    # After two seasons it predicts the next peak and trough; the mean would miss by ~15.
    assert max(errors[-period:]) < 3.0
    assert hw.predict() == pytest.approx(shape[len(series) % period], abs=3.0)


def test_predictions_never_go_negative():
    hw = feed(HoltWinters(window=1), [10.0, 5.0, 0.0, 0.0])
    assert hw >= 0.0 and not math.isnan(hw)


def test_holt_winters_forecasts_a_ramp_several_intervals_ahead():
    hw = HoltWinters(1000)  # a season longer than the series: level and trend only
    for v in range(0, 40, 2):  # +2 per interval
        hw.observe(float(v))
    assert hw.predict() == pytest.approx(40.0, abs=1.0)
    assert hw.forecast(6) == pytest.approx(50.0, abs=2.0)  # the start-up's worth ahead
    assert hw.forecast(1) == hw.predict()
