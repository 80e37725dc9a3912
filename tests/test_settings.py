"""Settings: one model, env twins, CLI flags bound to the same fields, pass-through to vLLM."""

from __future__ import annotations

import pytest
import typer
from pydantic import ValidationError

from dynvllm import settings as S


def test_every_field_has_a_unique_flag_and_env_twin():
    seen = set()
    for group in S.groups().values():
        for name in group.model_fields:
            assert name not in seen, f"{name} appears in two groups"
            seen.add(name)


def test_env_twins(monkeypatch):
    monkeypatch.setenv("DYN_NATS_URL", "nats://10.1.2.3:4222")
    monkeypatch.setenv("DYN_HTTP_PORT", "9001")
    monkeypatch.setenv("DYN_ROUTER", "round-robin")
    monkeypatch.setenv("DYN_MAX_MODEL_LEN", "512")
    s = S.build_settings()
    assert s.runtime.nats_url == "nats://10.1.2.3:4222"
    assert s.frontend.http_port == 9001
    assert s.router.router == "round-robin"
    assert s.engine.max_model_len == 512


def test_unprefixed_variables_are_not_read(monkeypatch):
    # Names of the groups themselves, as an operator's shell may hold them (launch scripts do).
    for name in ("ROUTER", "ENGINE", "WORKER", "RUNTIME", "FRONTEND", "EXTRA_ENGINE_ARGS", "HTTP_PORT"):
        monkeypatch.setenv(name, "kv")
    s = S.build_settings()
    assert s.router.router == "kv" and s.frontend.http_port == S.FrontendSettings().http_port
    assert s.extra_engine_args == []


def test_model_aliases():
    fe = S.FrontendSettings(model_aliases=" qwen3 = Qwen/Qwen3-0.6B ,tiny=/m/tiny,")
    assert fe.aliases() == {"qwen3": "Qwen/Qwen3-0.6B", "tiny": "/m/tiny"}
    with pytest.raises(ValidationError, match="'qwen3' is not ALIAS=MODEL"):
        S.FrontendSettings(model_aliases="qwen3")


def test_cli_overrides_beat_env(monkeypatch):
    monkeypatch.setenv("DYN_HTTP_PORT", "9001")
    s = S.build_settings({"frontend": {"http_port": 9002}})
    assert s.frontend.http_port == 9002


def test_cli_flags_reach_settings():
    from typer.testing import CliRunner

    from dynvllm.cli.options import with_settings

    seen = {}
    app = typer.Typer()

    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    @with_settings("frontend", "engine", "runtime")
    def cmd(ctx: typer.Context, settings: S.Settings) -> None:
        seen["s"] = settings

    r = CliRunner().invoke(
        app,
        [
            "--http-port",
            "1234",
            "--model",
            "m",
            "--no-enable-prefix-caching",
            "--enforce-eager",
            "--nats-url",
            "nats://h:1",
            "--max-num-seqs",
            "7",
        ],
    )
    assert r.exit_code == 0, r.output
    s = seen["s"]
    assert s.frontend.http_port == 1234 and s.engine.model == "m" and s.engine.enable_prefix_caching is False
    assert s.engine.enforce_eager is True and s.runtime.nats_url == "nats://h:1"
    assert s.extra_engine_args == ["--max-num-seqs", "7"]
    argv = s.vllm_argv()
    assert (
        argv[:2] == ["--model", "m"]
        and "--no-enable-prefix-caching" in argv
        and argv[-2:] == ["--max-num-seqs", "7"]
    )


def test_pass_through_is_parsed_by_vllm(tiny_model):
    from dynvllm.worker.engine_args import EngineArgsError, parse_engine_args

    s = S.build_settings(
        {"engine": {"model": str(tiny_model), "block_size": 64, "engine_args": "--max-num-seqs 9"}}
    )
    args = parse_engine_args(s)
    assert args.block_size == 64 and args.max_num_seqs == 9 and args.enable_prefix_caching is True
    bad = S.build_settings({"engine": {"model": str(tiny_model)}}, ["--max-num-seqs", "lots"])
    with pytest.raises(EngineArgsError, match="invalid int value: 'lots'"):
        parse_engine_args(bad)


@pytest.mark.parametrize("group,field,value", [("frontend", "http_port", 65536), ("worker", "rpc_port", -1)])
def test_bad_port_message(group, field, value):
    with pytest.raises(ValidationError) as info:
        S.build_settings({group: {field: value}})
    msg = S.explain(info.value)
    assert S.flag_name(field) in msg and S.env_name(field) in msg and "0-65535" in msg


def test_round_trip_to_child_process():
    s = S.build_settings(
        {"runtime": {"nats_url": "nats://x:1", "nats_token": "sekret"}, "engine": {"model": "m"}}, ["--foo"]
    )
    back = S.Settings.from_json(s.to_json())
    assert back.runtime.nats_token.get_secret_value() == "sekret"
    assert back.engine.model == "m" and back.extra_engine_args == ["--foo"]


def test_bad_namespace():
    with pytest.raises(ValidationError, match="invalid namespace"):
        S.build_settings({"runtime": {"namespace": "a.b"}})


def test_topology_is_role_counts():
    s = S.build_settings({"worker": {"roles": "prefill=2, decode=1"}})
    assert s.worker.topology() == [("prefill", 2), ("decode", 1)]
    assert S.build_settings().worker.topology() is None
    for bad, needle in [("prefill", "ROLE=COUNT"), ("a=1,a=2", "named twice"), ("a=0", "no worker")]:
        with pytest.raises(ValidationError, match=needle):
            S.build_settings({"worker": {"roles": bad}})


def test_a_plugin_group_reads_its_env_twin(monkeypatch):
    monkeypatch.setenv("DYN_DISAGG_MIN_PROMPT_TOKENS", "40")
    s = S.build_settings()
    assert s.plugin("prefill").disagg_min_prompt_tokens == 40
    assert s.plugin("encode").encoder_cache_entries == 4096  # the default
    assert not hasattr(s.router, "disagg_min_prompt_tokens")  # the core no longer holds it


def test_a_plugin_group_gets_flags_its_own_help_panel_and_checks():
    from typer.testing import CliRunner

    from dynvllm.cli.options import with_settings

    seen = {}
    app = typer.Typer()

    @app.command()
    @with_settings("router", plugins=True)
    def cmd(settings: S.Settings) -> None:
        seen["s"] = settings

    runner = CliRunner()
    r = runner.invoke(app, ["--disagg-min-prompt-tokens", "16", "--encoder-cache-dir", "/x"])
    assert r.exit_code == 0, r.output
    assert seen["s"].plugin("prefill").disagg_min_prompt_tokens == 16
    assert seen["s"].plugin("encode").encoder_cache_dir == "/x"
    r = runner.invoke(app, ["--help"], terminal_width=200)
    assert "Prefill role (disaggregated serving)" in r.output and "DYN_DISAGG_MIN_PROMPT_TOKENS" in r.output
    r = runner.invoke(app, ["--disagg-max-cached-fraction", "2"])
    assert r.exit_code == 2 and "DYN_DISAGG_MAX_CACHED_FRACTION" in r.output


def test_a_bad_plugin_env_value_fails_at_start_up(monkeypatch):
    monkeypatch.setenv("DYN_ENCODER_CACHE_ENTRIES", "0")
    with pytest.raises(ValidationError) as info:
        S.build_settings()
    assert "--encoder-cache-entries / DYN_ENCODER_CACHE_ENTRIES" in S.explain(info.value)


def test_round_trip_keeps_plugin_groups():
    s = S.build_settings({"prefill": {"disagg_min_prompt_tokens": 7}})
    s.plugin("encode").encoder_cache_dir = "/tmp/shared"  # as a role's service hook sets it
    back = S.Settings.from_json(s.to_json())
    assert back.plugin("prefill").disagg_min_prompt_tokens == 7
    assert back.plugin("encode").encoder_cache_dir == "/tmp/shared"
    assert type(back.plugin("prefill")) is S.plugin_groups()["prefill"]


def test_plugin_groups_by_class_and_unknown_names():
    from dynvllm import registry

    s = S.Settings()  # built in code: plugin groups come from defaults and DYN_*
    cls = S.plugin_groups()["prefill"]
    assert s.plugin(cls) is s.plugin("prefill")
    with pytest.raises(registry.PluginError, match=r"no usable settings group 'nope' \(installed: .*prefill"):
        s.plugin("nope")


def test_unknown_router_policy_lists_the_installed_ones():
    with pytest.raises(ValidationError) as info:
        S.build_settings({"router": {"router": "fastest"}})
    msg = S.explain(info.value)
    assert "--router / DYN_ROUTER: unknown router policy 'fastest'" in msg
    assert "choose one of kv, kv-approx, least-loaded, random, round-robin" in msg
