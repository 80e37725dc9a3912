"""The engine a worker builds gets the defaults `vllm serve` would give it for the same arguments."""

from __future__ import annotations

from dynvllm import settings as S
from dynvllm.worker.engine_args import parse_engine_args, vllm_config


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
