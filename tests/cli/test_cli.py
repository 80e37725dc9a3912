"""CLI: fast help without heavy imports, plugins listing, settings binding and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from dynvllm.cli import app

runner = CliRunner()


def test_help_imports_neither_vllm_nor_torch():
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom dynvllm.cli import app\n"
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(app, ['serve', 'agg', '--help']); assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(app, ['plugins']); assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('vllm', 'torch', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "dynvllm", "--help"], capture_output=True, check=True, timeout=60)
    assert time.monotonic() - t0 < 3.0  # well under 1 s on an idle machine; generous under test load


def test_plugins_json_lists_first_party_plugins():
    r = runner.invoke(app, ["plugins", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    names = {(p["group"], p["name"]) for p in rows}
    assert ("dynvllm.roles", "agg") in names and ("dynvllm.connectors", "none") in names
    agg = next(p for p in rows if p["name"] == "agg")
    assert agg["target"] == "dynvllm_plugins.roles.agg:AggRole" and agg["distribution"] == "dynvllm"


def test_serve_has_one_subcommand_per_role():
    r = runner.invoke(app, ["serve", "--help"])
    assert r.exit_code == 0 and "agg" in r.output


def test_bad_port_names_flag_env_and_range():
    r = runner.invoke(app, ["serve", "agg", "--model", "x", "--http-port", "70000"])
    assert r.exit_code == 2
    assert "--http-port" in r.output and "DYN_HTTP_PORT" in r.output and "0-65535" in r.output


def test_bad_port_from_env(monkeypatch):
    monkeypatch.setenv("DYN_RPC_PORT", "-5")
    r = runner.invoke(app, ["serve", "agg", "--model", "x"])
    assert r.exit_code == 2 and "DYN_RPC_PORT" in r.output and "0-65535" in r.output


def test_unknown_vllm_argument_shows_vllms_message(tiny_model):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dynvllm",
            "serve",
            "agg",
            "--model",
            str(tiny_model),
            "--no-such-engine-flag",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "unrecognized arguments: --no-such-engine-flag 3" in r.stderr


def test_serve_without_model_is_a_clear_error():
    r = runner.invoke(app, ["serve", "agg"], env={"DYN_MODEL": ""})
    assert r.exit_code == 2 and "--model" in r.output


def test_status_without_service_explains(monkeypatch, tmp_path):
    monkeypatch.setenv("DYN_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("DYN_NATS_URL", raising=False)
    r = runner.invoke(app, ["status"])
    assert r.exit_code == 2 and "--nats-url" in r.output and "dynvllm serve" in r.output


@pytest.mark.parametrize("policy", ["kv", "kv-approx", "round-robin", "random", "least-loaded"])
def test_every_router_policy_is_selectable(policy):
    from dynvllm.frontend.routing import Router
    from dynvllm.settings import build_settings

    s = build_settings({"router": {"router": policy}})
    router = Router(s.router)
    iid = router.choose(["w1", "w2"], list(range(64)), 32).worker
    assert iid in ("w1", "w2") and router.policy_name == policy


def test_unknown_router_policy_is_rejected():
    r = runner.invoke(app, ["serve", "agg", "--model", "m", "--router", "fastest"])
    assert r.exit_code == 2 and "--router" in r.output and "kv-approx" in r.output


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--kv-transfer-config", "{bad"], ["--kv-transfer-config", "not valid JSON"]),
        (
            ["--connector", "nixl", "--kv-transfer-config", "{}"],
            ["--connector", "--kv-transfer-config", "not both"],
        ),
        (["--connector", "warp"], ["no connector plugin named 'warp'", "nixl", "lmcache"]),
        (["--connector", "lmcache"], ["lmcache", "pip install lmcache"]),
        (["--connector", "kvbm"], ["kvbm", "pip install kvbm"]),
    ],
)
def test_kv_connector_errors_are_clear(args, needles):
    r = runner.invoke(app, ["serve", "prefill", "--model", "m", "--nats-url", "nats://127.0.0.1:1", *args])
    assert r.exit_code == 2, r.output
    flat = " ".join(r.output.split())
    for needle in needles:
        assert needle in flat, flat


def test_connectors_build_vllm_transfer_configs():
    from dynvllm.settings import build_settings
    from dynvllm.worker.connector import transfer_config

    s = build_settings({"worker": {"connector": "nixl"}})
    cfg, env, produces = transfer_config(s.worker.connectors(), "kv_producer", s)
    assert cfg == {"kv_connector": "NixlConnector", "kv_role": "kv_producer", "kv_buffer_device": "cpu"}
    assert produces and int(env["VLLM_NIXL_SIDE_CHANNEL_PORT"]) > 0
    # Decode engines dial the prefill engine at the host it announces: the worker's own address.
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
    s = build_settings({"worker": {"connector": "nixl"}, "runtime": {"advertise_host": "10.1.2.3"}})
    assert (
        transfer_config(s.worker.connectors(), "kv_consumer", s)[1]["VLLM_NIXL_SIDE_CHANNEL_HOST"]
        == "10.1.2.3"
    )

    s = build_settings({"worker": {"connector": "nixl,example"}})
    cfg, _, _ = transfer_config(s.worker.connectors(), "kv_consumer", s)
    assert cfg["kv_connector"] == "MultiConnector"
    assert [c["kv_connector"] for c in cfg["kv_connector_extra_config"]["connectors"]] == [
        "NixlConnector",
        "ExampleConnector",
    ]
    s = build_settings({"worker": {"connector": "none"}})
    assert transfer_config(s.worker.connectors(), "kv_consumer", s)[0] is None
    s = build_settings({"worker": {"kv_transfer_config": '{"kv_connector": "X", "kv_role": "kv_both"}'}})
    assert transfer_config(s.worker.connectors(), "kv_producer", s)[0] == {
        "kv_connector": "X",
        "kv_role": "kv_both",
    }


def test_a_connector_for_roles_that_move_no_kv_is_refused():
    r = runner.invoke(app, ["serve", "agg", "--model", "m", "--connector", "nixl"])
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "--connector configures KV transfer" in flat and "agg would ignore it" in flat
