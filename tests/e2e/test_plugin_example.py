"""The example plugin package (examples/plugin): installed the way a user installs a third-party
plugin, found by entry point, and serving the tiny model through real vLLM."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import start_agg, wait_http, want_reference

pytestmark = pytest.mark.vllm
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plugin"
LIMIT = 12
SHORT, LONG = "the cat sees a dog", "the cat sees a dog " * 10
REFERENCE = want_reference(
    "plugin", [{"kind": "completion", "input": SHORT, "params": {"max_tokens": 8, "temperature": 0}}]
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """pip-installs a copy of the package into a scratch folder; the environment that sees it."""
    work = tmp_path_factory.mktemp("plugin")
    shutil.copytree(EXAMPLE, work / "src")
    target = work / "site"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(work / "src")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return {"PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}


def _run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


def test_entry_points_are_listed_beside_the_first_party_ones(installed):
    res = _run(installed, "-m", "dynvllm", "plugins", "--json")
    assert res.returncode == 0, res.stderr
    rows = {(r["group"], r["name"]): r for r in json.loads(res.stdout)}
    assert rows[("dynvllm.roles", "capped")]["distribution"].startswith("dynvllm-example-plugin")
    assert rows[("dynvllm.connectors", "shared-folder")]["target"].endswith(":SharedFolderConnector")
    assert ("dynvllm.roles", "agg") in rows


def test_connector_config_is_accepted_by_vllm(installed, tmp_path):
    code = (
        "from dynvllm import registry\n"
        "from dynvllm.settings import build_settings\n"
        "from vllm.config import KVTransferConfig\n"
        "c = registry.load(registry.CONNECTORS, 'shared-folder')()\n"
        "cfg = KVTransferConfig(**c.vllm_config('kv_producer', build_settings()))\n"
        "print(cfg.kv_connector, cfg.kv_connector_extra_config['shared_storage_path'])\n"
    )
    res = _run({**installed, "SHARED_KV_FOLDER": str(tmp_path)}, "-c", code)
    assert res.stdout.split() == ["ExampleConnector", str(tmp_path)], res.stderr[-2000:]


def test_the_example_role_serves_and_refuses_long_prompts(installed, tiny_model, references, tmp_path):
    expected = references[REFERENCE][0][0]
    env = {**installed, "CAPPED_MAX_PROMPT_TOKENS": str(LIMIT)}
    url, proc = start_agg(tiny_model, tmp_path / "serve.log", "capped", role="capped", env=env)
    try:
        wait_http(url + "/health", lambda b: b.get("roles", {}).get("tiny") == {"capped": 1}, proc)
        body = {"model": "tiny", "max_tokens": 8, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json={**body, "prompt": SHORT}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected, r.text
        r = httpx.post(url + "/v1/completions", json={**body, "prompt": LONG}, timeout=60)
        assert r.status_code == 400, r.text
        assert f"at most {LIMIT} tokens" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={**body, "prompt": SHORT}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
    finally:
        proc.stop()
