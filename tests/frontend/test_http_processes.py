"""`--http-workers`: a count, or `auto` sized from the cores the frontend may use."""

import pytest
from pydantic import ValidationError

from dynvllm.cores import process_count, quota_cores
from dynvllm.settings import build_settings


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 1), (7, 1), (8, 2), (12, 3), (16, 4), (64, 4)])
def test_auto_gives_one_process_per_four_cores_up_to_four(cores, expected):
    assert process_count("auto", cores) == expected


def test_a_number_is_taken_as_it_is_whatever_the_cores():
    assert process_count(3, 2) == 3
    assert process_count(1, 64) == 1


@pytest.mark.parametrize(("given", "kept"), [("auto", "auto"), ("3", 3), (2, 2)])
def test_settings_take_a_count_or_auto(given, kept):
    assert build_settings({"frontend": {"http_workers": given}}).frontend.http_workers == kept


@pytest.mark.parametrize("bad", ["0", "many", 65])
def test_settings_refuse_other_values(bad):
    with pytest.raises(ValidationError, match="http_workers"):
        build_settings({"frontend": {"http_workers": bad}})


@pytest.mark.parametrize(
    ("cores", "engines", "expected"), [(16, 1, 4), (16, 6, 4), (16, 7, 2), (16, 8, 1), (32, 8, 4), (8, 4, 1)]
)
def test_auto_leaves_two_cores_to_each_engine_started_beside_it(cores, engines, expected):
    assert process_count("auto", cores, engines) == expected


@pytest.mark.parametrize(
    ("cpu_max", "v1", "expected"),
    [
        ("max 100000", None, None),
        ("200000 100000", None, 2),
        ("250000 100000", None, 2),
        ("50000 100000", None, 1),
        ("garbage", None, None),
        (None, ("-1", "100000"), None),
        (None, ("400000", "100000"), 4),
        (None, None, None),
    ],
)
def test_a_cgroup_cpu_quota_caps_the_cores(cpu_max, v1, expected):
    assert quota_cores(cpu_max, *(v1 or (None, None))) == expected


def test_serve_sizes_auto_for_the_engines_it_starts(monkeypatch):
    from dynvllm import cores
    from dynvllm.supervisor import Service

    monkeypatch.setattr(cores, "usable_cores", lambda: 16)
    monkeypatch.delenv("DYN_HTTP_WORKERS", raising=False)  # the suite pins one process
    settings = build_settings({"engine": {"model": "m", "tensor_parallel_size": 2}})
    assert settings.frontend.http_workers == "auto"  # the default
    assert Service(settings, [("agg", 1)])._frontend_settings().frontend.http_workers == 4
    assert Service(settings, [("prefill", 2), ("decode", 2)])._frontend_settings().frontend.http_workers == 1
    fixed = build_settings({"frontend": {"http_workers": 3}})
    assert Service(fixed, [("agg", 8)])._frontend_settings() is None  # a number is kept as given
