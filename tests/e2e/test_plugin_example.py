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

from tests.helpers import SIM, start_agg, stop_in_background, wait_http, want_reference

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
    url, proc = start_agg(
        tiny_model, tmp_path / "serve.log", "capped", "--capped-max-prompt-tokens", str(LIMIT),
        role="capped", env=installed,
    )  # fmt: skip
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
        stop_in_background([proc])


def test_plugin_settings_groups_are_flags_of_serve(installed):
    """A role's and a policy's settings groups become flags of `serve`, each in its own panel."""
    res = _run({**installed, "COLUMNS": "200"}, "-m", "dynvllm", "serve", "agg", "--help")
    assert res.returncode == 0, res.stderr
    for text in (
        "--capped-max-prompt-tokens",
        "DYN_CAPPED_MAX_PROMPT_TOKENS",
        "Capped role (example plugin)",
        "--prefix-hash-tokens",
        "Prefix-hash router (example plugin)",
    ):
        assert text in res.stdout
    bad = _run(installed, "-m", "dynvllm", "serve", "agg", "--model", "m", "--capped-max-prompt-tokens", "0")
    assert bad.returncode != 0 and "--capped-max-prompt-tokens" in bad.stderr


def test_the_example_policy_routes_each_prefix_to_its_owner(installed, tiny_model, tmp_path):
    """`--router prefix-hash` from the example package: each prompt goes to the worker its first
    N tokens hash to (sim workers: the routing, not the engine, is under test)."""
    n = 4
    url, proc = start_agg(
        tiny_model, tmp_path / "serve.log", "phash", "--router", "prefix-hash",
        "--prefix-hash-tokens", str(n), workers=2, engine_args=SIM, env=installed,
    )  # fmt: skip
    try:
        wait_http(url + "/health", lambda b: b.get("workers") == 2, proc)
        picks = []
        for i in range(12):
            prompt = f"prefix {i} says hello and more words follow"
            ids = httpx.post(url + "/tokenize", json={"model": "tiny", "prompt": prompt}).json()["tokens"]
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 2}
            first = httpx.post(url + "/v1/completions", json=body, timeout=60)
            again = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert first.status_code == again.status_code == 200, first.text
            worker = first.headers["x-dynvllm-worker"]
            assert again.headers["x-dynvllm-worker"] == worker  # the same prefix, the same worker
            picks.append((ids[:n], worker))
        workers = sorted({w for _, w in picks})
        assert len(workers) == 2  # 12 prefixes spread over both
        sys.path.insert(0, installed["PYTHONPATH"].split(os.pathsep)[0])
        try:
            from dynvllm_example.policy import owner
        finally:
            sys.path.pop(0)
        assert all(owner(workers, prefix) == w for prefix, w in picks)
    finally:
        stop_in_background([proc])
