"""Engine arguments: dynvllm's settings plus pass-through flags, parsed by vLLM's own parser."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NoReturn

from dynvllm.settings import Settings


class EngineArgsError(ValueError):
    """vLLM rejected an engine argument; the message is vLLM's own."""


def parse_engine_args(settings: Settings, overrides: dict[str, Any] | None = None):
    """AsyncEngineArgs from settings; `overrides` are set by roles/connectors after parsing."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class _Parser(FlexibleArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise EngineArgsError(f"vLLM engine arguments: {message}")

        def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
            raise EngineArgsError(f"vLLM engine arguments: {message or 'exit ' + str(status)}")

    parser = _Parser(prog="vllm engine arguments")
    parser = AsyncEngineArgs.add_cli_args(parser)
    argv = settings.vllm_argv()
    if not settings.engine.model:
        raise EngineArgsError("no model: pass --model (a Hugging Face id or a local folder) or set DYN_MODEL")
    _refuse_server_flags(argv, set(parser._option_string_actions))
    ns = parser.parse_args(argv)
    args = AsyncEngineArgs.from_cli_args(ns)
    for key, value in (overrides or {}).items():
        setattr(args, key, value)
    return args


#: What dynvllm offers instead of some flags of vLLM's server.
_INSTEAD = {
    "--api-server-count": "--http-workers N runs several frontend processes",
    "-asc": "--http-workers N runs several frontend processes",
    "--lora-modules": "load adapters with `dynvllm lora load NAME --source ...`",
    "--disable-uvicorn-access-log": "dynvllm writes no access log anyway",
}


def server_flags(engine_flags: set[str]) -> set[str]:
    """The flags of vLLM's OpenAI server (`vllm serve`) that are not engine arguments, from this
    vLLM's own parser (empty when this vLLM keeps them elsewhere)."""
    import importlib

    from vllm.utils.argparse_utils import FlexibleArgumentParser

    # Where the server's arguments live moved between releases (openai/ before launchers/).
    for name in ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args"):
        try:
            make_arg_parser = importlib.import_module(name).make_arg_parser
        except (ImportError, AttributeError):
            continue
        return set(make_arg_parser(FlexibleArgumentParser())._option_string_actions) - engine_flags
    return set()


def _refuse_server_flags(argv: list[str], engine_flags: set[str]) -> None:
    """Name a flag of vLLM's server that reached the engine's parser as what it is, rather than
    let vLLM call it an unrecognized engine argument."""
    given = [a.split("=", 1)[0] for a in argv if a.startswith("-")]
    given = ["--" + a[2:].replace("_", "-") if a.startswith("--") else a for a in given]
    if not any(a not in engine_flags for a in given):
        return
    found = [a for a in dict.fromkeys(given) if a in server_flags(engine_flags)]
    if found:
        hints = [f"{a}: {_INSTEAD[a]}" for a in found if a in _INSTEAD]
        raise EngineArgsError(
            f"{', '.join(found)}: {'a flag' if len(found) == 1 else 'flags'} of vLLM's server (vllm serve) "
            "that dynvllm does not implement; remove "
            f"{'it' if len(found) == 1 else 'them'} (docs/compatibility.md lists what carries over)"
            + ("; " + "; ".join(hints) if hints else "")
        )


def publish_kv_events(args: Any, endpoint: str | None, replay: str | None) -> None:
    """Have the engine publish its KV events to the worker's relay (`endpoint`, and `replay` for
    missed batches), unless caching is off or the user configured KV events themselves."""
    if endpoint and args.enable_prefix_caching and args.kv_events_config is None:
        from vllm.config import KVEventsConfig

        args.kv_events_config = KVEventsConfig(
            enable_kv_cache_events=True,
            publisher="zmq",
            topic="kv",
            endpoint=endpoint,
            replay_endpoint=replay,
        )


def start_method(chosen: str | None, environ: Mapping[str, str]) -> str:
    """How vLLM starts the engine core's processes: the operator's choice, else vLLM's own
    variable, else spawn, which `vllm serve` sets too (vLLM's library default is fork). Measured
    on an H200 at c=16: a forked engine core stepped 6% slower than a spawned one (inter-token
    p50 2.34-2.39 vs 2.19-2.21 ms, KV events on or off alike), and started no faster."""
    return chosen or environ.get("VLLM_WORKER_MULTIPROC_METHOD") or "spawn"


def use_start_method(settings: Settings) -> None:
    """Set `start_method` where vLLM reads it (before the engine starts its processes)."""
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = start_method(settings.worker.engine_start_method, os.environ)


def engine_start_args(
    settings: Settings, model: str, overrides: dict[str, Any], kv_endpoint: str | None, kv_replay: str | None
) -> Any:
    """The arguments an engine about to start takes (agg, and headless ranks alike): parsed as
    `vllm serve` parses them with the role's `overrides`, its KV events sent to the worker's
    relay, and the engine core's start method set."""
    args = parse_engine_args(settings, {"model": model, **overrides})
    publish_kv_events(args, kv_endpoint, kv_replay)
    use_start_method(settings)
    return args


def vllm_config(args: Any, headless: bool = False) -> Any:
    """The engine configuration `vllm serve` builds from the same arguments (`headless`: for
    engine ranks whose leader runs elsewhere).

    vLLM picks defaults by usage context (token budget per step, sequences per batch, and with
    them the CUDA-graph capture sizes): without the server's context an engine gets the smaller
    library defaults, which cost throughput and first-token latency under load on a GPU.
    """
    from vllm.usage.usage_lib import UsageContext

    return args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER, headless=headless)
