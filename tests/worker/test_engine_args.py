"""Engine arguments: parsed by vLLM's own parser, with the defaults `vllm serve` would give the
engine for the same arguments, and KV events pointed at the worker's relay."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dynvllm import settings as S
from dynvllm.worker.engine_args import parse_engine_args, publish_kv_events, start_method, vllm_config


def test_the_engine_gets_the_servers_batch_defaults(tiny_model, monkeypatch):
    """vLLM chooses max_num_batched_tokens / max_num_seqs by usage context. On a CPU the server
    and library tables coincide, so give vLLM tables that differ (as an H100's do) and check that
    the worker's configuration takes the server's column."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    tables = (
        {UsageContext.LLM_CLASS: 16384, UsageContext.OPENAI_API_SERVER: 8192},
        {UsageContext.LLM_CLASS: 1024, UsageContext.OPENAI_API_SERVER: 512},
    )
    monkeypatch.setattr(EngineArgs, "get_batch_defaults", classmethod(lambda cls, world_size: tables))
    s = S.build_settings(
        {"engine": {"model": str(tiny_model), "block_size": 32, "kv_cache_memory_bytes": 64 << 20}}
    )
    cfg = vllm_config(parse_engine_args(s))
    assert (cfg.scheduler_config.max_num_batched_tokens, cfg.scheduler_config.max_num_seqs) == (8192, 512)


def test_explicit_engine_arguments_still_win(tiny_model):
    s = S.build_settings({"engine": {"model": str(tiny_model), "block_size": 32}}, ["--max-num-seqs", "7"])
    cfg = vllm_config(parse_engine_args(s))
    assert cfg.scheduler_config.max_num_seqs == 7


def test_vllms_parser_judges_the_engine_arguments(tiny_model):
    from dynvllm.worker.engine_args import EngineArgsError

    with pytest.raises(EngineArgsError, match="no model"):
        parse_engine_args(S.build_settings({}))
    s = S.build_settings({"engine": {"model": str(tiny_model)}}, ["--no-such-engine-flag", "3"])
    with pytest.raises(EngineArgsError, match="vLLM engine arguments: unrecognized arguments"):
        parse_engine_args(s)
    s = S.build_settings({"engine": {"model": str(tiny_model)}}, ["--max-num-seqs", "7"])
    args = parse_engine_args(s, {"model": "/elsewhere", "max_num_seqs": 9})  # roles override after parsing
    assert (args.model, args.max_num_seqs) == ("/elsewhere", 9)


def test_kv_events_go_to_the_relay_unless_caching_is_off_or_the_user_set_them():
    from vllm.config import KVEventsConfig

    def args(**kw):
        return SimpleNamespace(**{"enable_prefix_caching": True, "kv_events_config": None, **kw})

    a = args()
    publish_kv_events(a, "tcp://127.0.0.1:5557", "tcp://127.0.0.1:5560")
    cfg = a.kv_events_config
    assert isinstance(cfg, KVEventsConfig) and cfg.enable_kv_cache_events
    assert (cfg.publisher, cfg.topic) == ("zmq", "kv")
    assert (cfg.endpoint, cfg.replay_endpoint) == ("tcp://127.0.0.1:5557", "tcp://127.0.0.1:5560")
    for off in (args(enable_prefix_caching=False), args(kv_events_config="mine")):
        before = off.kv_events_config
        publish_kv_events(off, "tcp://127.0.0.1:5557", None)
        assert off.kv_events_config == before
    nowhere = args()
    publish_kv_events(nowhere, None, None)
    assert nowhere.kv_events_config is None


@pytest.mark.parametrize(
    ("chosen", "environ", "method"),
    [
        (None, {}, "spawn"),  # as `vllm serve` (vLLM's library default would fork)
        (None, {"VLLM_WORKER_MULTIPROC_METHOD": "fork"}, "fork"),  # vLLM's own knob is kept
        ("fork", {}, "fork"),
        ("spawn", {"VLLM_WORKER_MULTIPROC_METHOD": "fork"}, "spawn"),  # the flag wins over the env
    ],
)
def test_engine_processes_spawn_unless_the_operator_says_otherwise(chosen, environ, method):
    assert start_method(chosen, environ) == method
