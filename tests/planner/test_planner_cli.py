"""`dynvllm planner` and `dynvllm profile` refuse bad input in one line, exit 2, before any I/O."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "dynvllm", *args], capture_output=True, text=True, timeout=60)
    return p.returncode, p.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "needs --planner-profile"),
        (["--planner-profile", "{missing}"], "cannot read the profile"),
        (["--planner-profile", "{profile}", "--planner-roles", "decode"], "dynvllm profile --role decode"),
        (["--planner-profile", "{profile}", "--predictor", "crystal-ball"], "installed planner predictors"),
        (
            ["--planner-profile", "{profile}", "--min-workers", "3", "--max-workers", "2"],
            "above --max-workers",
        ),
    ],
)
def test_planner_refusals(tmp_path, args, says):
    profile = tmp_path / "p.json"
    level = {"concurrency": 1, "request_rate": 1, "ttft_p50": 0, "ttft_p90": 0, "itl_p50": 0, "itl_p90": 0}
    profile.write_text(json.dumps({"roles": {"agg": {"points": [{"isl": 1, "osl": 1, "sweep": [level]}]}}}))
    filled = [a.format(profile=profile, missing=tmp_path / "none.json") for a in args]
    code, err = run("planner", "--nats-url", "nats://127.0.0.1:1", *filled)
    assert code == 2 and says in " ".join(err.split()), err


def test_profile_refuses_a_bad_sweep():
    code, err = run("profile", "--model", "m", "--concurrency", "0,2")
    assert code == 2 and "--concurrency takes positive integers" in err


def test_scale_without_a_service_says_so():
    code, err = run("scale", "agg", "2", "--nats-url", "nats://127.0.0.1:1", "--timeout", "0.5")
    assert code == 2 and "cannot reach NATS" in " ".join(err.split()), err
