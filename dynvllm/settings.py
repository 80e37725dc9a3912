"""The single source of configuration.

Every field has a `DYN_<FIELD>` environment twin and a `--<field>` CLI flag (see
`dynvllm.cli.options`), so field names are unique across groups. Engine arguments dynvllm
does not model pass through to vLLM's own parser (`engine_args` / extra CLI arguments).

The core groups hold what every deployment shares; a plugin declares its own group (a
`SettingsGroup` named in the entry-point group `dynvllm.settings`) and reads it with
`settings.plugin(...)`: its fields get flags, `DYN_*` twins, help and docs the same way.
"""

from __future__ import annotations

import functools
import json
import shlex
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, overload

from pydantic import (
    Field,
    SecretStr,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from dynvllm import registry, settings_plugins
from dynvllm.planner.settings import PlannerSettings
from dynvllm.settings_base import ENV_PREFIX as ENV_PREFIX
from dynvllm.settings_base import SettingsGroup as SettingsGroup
from dynvllm.settings_base import env_name as env_name
from dynvllm.settings_base import flag_name as flag_name
from dynvllm.settings_frontend import FrontendSettings as FrontendSettings
from dynvllm.settings_frontend import RouterSettings as RouterSettings
from dynvllm.settings_frontend import check_port

G = TypeVar("G", bound=SettingsGroup)


class RuntimeSettings(SettingsGroup):
    title: ClassVar[str] = "Runtime (NATS)"
    nats_url: str | None = Field(
        None, description="NATS server to join; without it `serve` starts a private one."
    )
    nats_token: SecretStr | None = Field(None, description="NATS auth token.")
    nats_user: str | None = Field(None, description="NATS user name.")
    nats_password: SecretStr | None = Field(None, description="NATS password.")
    nats_tls_ca: Path | None = Field(None, description="CA bundle to verify the NATS server.")
    nats_tls_cert: Path | None = Field(None, description="Client certificate for NATS mTLS.")
    nats_tls_key: Path | None = Field(None, description="Client key for NATS mTLS.")
    namespace: str = Field("dynvllm", description="Namespace that isolates one service on a NATS cluster.")
    lease_ttl: float = Field(
        2.0, gt=0, description="Seconds without heartbeat before an instance counts as gone."
    )
    heartbeat_interval: float = Field(0.5, gt=0, description="Seconds between instance heartbeats.")
    admin_token: SecretStr | None = Field(
        None,
        description="Token that state-changing operations (LoRA load/unload, ...) must carry; "
        "the CLI and the frontend pass it on.",
    )
    advertise_host: str | None = Field(
        None,
        description="Address other processes use to reach this one "
        "(default: loopback with a private NATS, else this host's address).",
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "warning",
        description="Level of dynvllm's own logs, in every process `serve` starts (vLLM's own: "
        "VLLM_LOGGING_LEVEL).",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines as text, or as JSON objects (one a line, with the request id where "
        "there is one).",
    )
    otlp_traces_endpoint: str | None = Field(
        None,
        description="OpenTelemetry collector to send traces to (frontend, workers and vLLM's engine); "
        "the protocol is OTEL_EXPORTER_OTLP_TRACES_PROTOCOL's, grpc by default as in vLLM, or "
        "http/protobuf (then give the full URL, .../v1/traces). Needs the `tracing` extra.",
    )

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        from dynvllm.runtime.names import validate_token

        return validate_token(v, "namespace")


def parse_roles(text: str) -> list[tuple[str, int]]:
    """'prefill=1,decode=2' -> [("prefill", 1), ("decode", 2)]; a role named twice is an error."""
    out: dict[str, int] = {}
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        name, sep, count = part.partition("=")
        if not sep or not name or not count.isdigit():
            raise ValueError(f"{part!r} is not ROLE=COUNT (e.g. 'prefill=1,decode=2')")
        if name in out:
            raise ValueError(f"role {name!r} is named twice")
        if not 0 <= int(count) <= 256:
            raise ValueError(f"{name}={count}: a count is between 0 and 256")
        out[name] = int(count)
    if not any(out.values()):
        raise ValueError("the topology starts no worker")
    return list(out.items())


class WorkerSettings(SettingsGroup):
    title: ClassVar[str] = "Worker"
    workers: int = Field(1, ge=1, le=256, description="Workers `serve` starts for the role.")
    engine: str = Field(
        "vllm", description="Engine plugin: vllm (real) or sim (simulated, for routing experiments)."
    )
    rpc_port: int = Field(0, description="Port of the worker's stream server (0 picks a free one).")
    metrics_port: int = Field(
        0,
        description="Port of the worker's Prometheus endpoint, vLLM's engine metrics included "
        "(0 picks a free one and announces it in discovery; -1 turns it off; a fixed N: the k-th "
        "worker `serve` starts uses N+k, the same after a restart).",
    )
    headless: bool = Field(
        False,
        description="Run only this host's data-parallel ranks of an engine led by a worker elsewhere "
        "(with --data-parallel-size, --data-parallel-size-local, --data-parallel-start-rank, "
        "--data-parallel-address, --data-parallel-rpc-port); needs --no-frontend.",
    )
    kv_events: bool = Field(
        True,
        description="Publish the engine's KV-cache events to routers (needs prefix caching). Off: the "
        "engine does no event work and a kv router sees no cache contents from this worker (use "
        "--router kv-approx on the frontend).",
    )
    engine_start_method: Literal["spawn", "fork"] | None = Field(
        None,
        description="How the engine core's processes start: spawn (a fresh interpreter, as `vllm "
        "serve` starts them) or fork (a copy of the worker). Default: VLLM_WORKER_MULTIPROC_METHOD "
        "when set, else spawn; forked engine cores stepped ~6% slower on a GPU (docs/benchmarks.md).",
    )
    max_restarts: int = Field(
        5,
        ge=0,
        description="Times `serve` restarts a crashed worker (with back-off; the count resets after "
        "10 minutes of service); 0 leaves crashed workers down.",
    )
    drain_timeout: float = Field(
        30.0, ge=0, description="Seconds in-flight requests get to finish on SIGTERM."
    )
    health_check_interval: float = Field(10.0, gt=0, description="Seconds between engine health canaries.")
    connector: str | None = Field(
        None,
        description="KV connector(s) for roles that move KV, e.g. 'nixl' or 'nixl,lmcache' "
        "(default: the role's own choice).",
    )
    kv_transfer_config: str | None = Field(
        None, description="vLLM KVTransferConfig as JSON; replaces --connector."
    )
    lora_roots: str | None = Field(
        None,
        description="Local folders LoRA adapters may be loaded from, comma-separated (links and '..' "
        "are resolved before the check); without it local adapter sources are refused.",
    )
    lora_schemes: str = Field("file,hf", description="Adapter source schemes allowed: file, hf, s3.")
    lora_cache_dir: str | None = Field(
        None, description="Where remote adapters are downloaded (default: hub cache)."
    )
    roles: str | None = Field(
        None,
        description="Topology `serve` starts, as role counts: 'prefill=1,decode=2' "
        "(default: the command's role with --workers, or the preset's counts).",
    )

    @field_validator("roles")
    @classmethod
    def _roles(cls, v: str | None) -> str | None:
        if v is not None:
            parse_roles(v)
        return v

    def lora_root_list(self) -> list[str]:
        return [r.strip() for r in (self.lora_roots or "").split(",") if r.strip()]

    def lora_scheme_list(self) -> list[str]:
        return [r.strip() for r in self.lora_schemes.split(",") if r.strip()]

    def topology(self) -> list[tuple[str, int]] | None:
        return parse_roles(self.roles) if self.roles else None

    @model_validator(mode="after")
    def _one_kv_source(self) -> WorkerSettings:
        if self.connector is not None and self.kv_transfer_config is not None:
            raise ValueError(
                "give either --connector (DYN_CONNECTOR) or --kv-transfer-config "
                "(DYN_KV_TRANSFER_CONFIG), not both"
            )
        return self

    def connectors(self) -> list[str]:
        """The connectors asked for; empty means each role's default."""
        return [c for c in (self.connector or "").replace(",", " ").split() if c]

    @field_validator("rpc_port")
    @classmethod
    def _port(cls, v: int) -> int:
        return check_port(v, allow_zero=True)

    @field_validator("metrics_port")
    @classmethod
    def _metrics_port(cls, v: int) -> int:
        return v if v == -1 else check_port(v, allow_zero=True)


class EngineSettings(SettingsGroup):
    title: ClassVar[str] = "Engine (vLLM)"
    model: str | None = Field(None, description="Hugging Face model id or local folder.")
    served_model_name: str | None = Field(None, description="Name clients use (default: --model).")
    tokenizer: str | None = Field(None, description="Tokenizer id or folder (default: the model).")
    revision: str | None = Field(None, description="Model revision to download from the hub.")
    max_model_len: int | None = Field(None, gt=0, description="Context length.")
    block_size: int | None = Field(None, gt=0, description="KV-cache block size in tokens.")
    dtype: str | None = Field(None, description="Weights dtype (auto, bfloat16, float16, float32).")
    enforce_eager: bool | None = Field(None, description="Skip graph capture/compilation (faster start).")
    kv_cache_memory_bytes: int | None = Field(None, gt=0, description="KV-cache size in bytes.")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Share of accelerator memory (host memory on CPU)."
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse KV blocks across requests with a shared prefix."
    )
    seed: int | None = Field(None, description="Engine random seed.")
    tensor_parallel_size: int | None = Field(None, ge=1, description="Tensor-parallel degree.")
    engine_args: str = Field("", description="More vLLM engine arguments, as on vLLM's command line.")


#: The core's groups; `groups()` adds the plugins'.
GROUPS: dict[str, type[SettingsGroup]] = {
    "runtime": RuntimeSettings,
    "frontend": FrontendSettings,
    "router": RouterSettings,
    "worker": WorkerSettings,
    "engine": EngineSettings,
    "planner": PlannerSettings,
}


@functools.cache
def _plugin_groups() -> tuple[dict[str, type[SettingsGroup]], dict[str, str]]:
    return settings_plugins.load(GROUPS)


def plugin_groups() -> dict[str, type[SettingsGroup]]:
    """The settings groups plugins declare (entry-point group `dynvllm.settings`), by name;
    loaded once per process."""
    return _plugin_groups()[0]


def reload_plugin_groups() -> None:
    """Look for plugin groups again (for code that installs plugins while running: tests)."""
    _plugin_groups.cache_clear()


def groups() -> dict[str, type[SettingsGroup]]:
    """Every settings group: the core's, then the plugins'."""
    return {**GROUPS, **plugin_groups()}


def title(name: str) -> str:
    """A group's heading in --help and docs/configuration.md."""
    return groups()[name].title or f"{name} plugin"


def _plugin_class(name: str) -> type[SettingsGroup]:
    cls = plugin_groups().get(name)
    if cls is None:
        reason = _plugin_groups()[1].get(name) or f"installed: {', '.join(plugin_groups()) or 'none'}"
        raise registry.PluginError(f"no usable settings group {name!r} ({reason})")
    return cls


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The groups read DYN_* themselves; left to its defaults this model would also parse a
        # user's unrelated ROUTER, ENGINE or WORKER variable as a whole group and fail on it.
        return (init_settings,)

    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    frontend: FrontendSettings = Field(default_factory=FrontendSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    planner: PlannerSettings = Field(default_factory=PlannerSettings)
    #: Plugin groups by name; read them through `plugin()`.
    plugins: dict[str, SerializeAsAny[SettingsGroup]] = Field(default_factory=dict)
    # Engine arguments given on the command line that dynvllm does not model.
    extra_engine_args: list[str] = Field(default_factory=list)

    @overload
    def plugin(self, group: type[G]) -> G: ...
    @overload
    def plugin(self, group: str) -> SettingsGroup: ...
    def plugin(self, group: str | type[SettingsGroup]) -> SettingsGroup:
        """A plugin's settings group, by its name in `dynvllm.settings` or by its class."""
        if isinstance(group, str):
            name = group
        else:
            name = next((n for n, c in plugin_groups().items() if c is group), group.__name__)
        found = self.plugins.get(name)
        if found is None:
            # Settings built in code (tests, tools) start without plugin groups: defaults < DYN_*.
            found = self.plugins[name] = _plugin_class(name)()
        return found

    def to_json(self) -> str:
        """Serialise for a child process (secrets included: children need them)."""

        def plain(group: BaseSettings) -> dict:
            out = {}
            for k, v in group.model_dump().items():
                out[k] = (
                    v.get_secret_value()
                    if isinstance(v, SecretStr)
                    else (str(v) if isinstance(v, Path) else v)
                )
            return out

        data: dict = {name: plain(getattr(self, name)) for name in GROUPS}
        data["plugins"] = {name: plain(group) for name, group in self.plugins.items()}
        data["extra_engine_args"] = self.extra_engine_args
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Settings:
        data = json.loads(text)
        # Any: each name is a field of its own group type, which a dict's type cannot say.
        core: dict[str, Any] = {name: GROUPS[name](**data[name]) for name in GROUPS}
        plugins = {name: _plugin_class(name)(**values) for name, values in data.get("plugins", {}).items()}
        return cls(**core, plugins=plugins, extra_engine_args=data.get("extra_engine_args", []))

    def publishes_kv_events(self) -> bool:
        """Whether a worker relays its engine's KV events to routers (prefix caching and --kv-events)."""
        return self.engine.enable_prefix_caching and self.worker.kv_events

    def vllm_argv(self) -> list[str]:
        """vLLM command-line arguments for the engine, validated later by vLLM's own parser."""
        eng = self.engine
        argv: list[str] = []
        if eng.model:
            argv += ["--model", eng.model]
        for name in (
            "served_model_name",
            "tokenizer",
            "revision",
            "max_model_len",
            "block_size",
            "dtype",
            "kv_cache_memory_bytes",
            "gpu_memory_utilization",
            "seed",
            "tensor_parallel_size",
        ):
            value = getattr(eng, name)
            if value is not None:
                argv += ["--" + name.replace("_", "-"), str(value)]
        if eng.enforce_eager:
            argv.append("--enforce-eager")
        argv.append("--enable-prefix-caching" if eng.enable_prefix_caching else "--no-enable-prefix-caching")
        if self.runtime.otlp_traces_endpoint:
            # vLLM's own spans join the trace the worker continues (see dynvllm.tracing).
            argv += ["--otlp-traces-endpoint", self.runtime.otlp_traces_endpoint]
        argv += shlex.split(eng.engine_args)
        argv += self.extra_engine_args
        return argv


def explain(err: ValidationError) -> str:
    """Turn a pydantic error into lines naming the flag and environment variable to fix."""
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if not e["loc"]:  # a rule across fields: its message names the flags
            lines.append(f"Invalid options: {msg}")
            continue
        field = str(e["loc"][-1])
        lines.append(f"Invalid {flag_name(field)} / {env_name(field)}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def build_settings(
    overrides: dict[str, dict] | None = None, extra_engine_args: list[str] | None = None
) -> Settings:
    """Settings from defaults < DYN_* environment < explicit overrides (CLI flags)."""
    overrides = overrides or {}
    core: dict[str, Any] = {name: cls(**overrides.get(name, {})) for name, cls in GROUPS.items()}
    # Every installed plugin's group, so a bad DYN_* value fails at start-up, not on first use.
    plugins = {name: cls(**overrides.get(name, {})) for name, cls in plugin_groups().items()}
    return Settings(**core, plugins=plugins, extra_engine_args=list(extra_engine_args or []))
