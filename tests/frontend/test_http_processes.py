"""`--http-workers`: a count, or `auto` sized from the cores the frontend may use."""

import pytest
from pydantic import ValidationError

from dynvllm.frontend.processes import process_count
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
