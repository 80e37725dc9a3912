"""The frontend process's settings groups: HTTP serving, admission and tenants, and the router."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal, TypeVar

from pydantic import Field, SecretStr, field_validator, model_validator

from dynvllm import registry
from dynvllm.settings_base import SettingsGroup

_Port = TypeVar("_Port", int, int | None)


def check_port(value: _Port, *, allow_zero: bool) -> _Port:
    low = 0 if allow_zero else 1
    if value is not None and not (low <= value <= 65535):
        raise ValueError(f"port {value} is outside the allowed range {low}-65535")
    return value


def alias_pairs(text: str | None) -> dict[str, str]:
    """'a=M, b=N' -> {"a": "M", "b": "N"}; ValueError names a pair that is not ALIAS=MODEL."""
    out: dict[str, str] = {}
    for pair in (text or "").split(","):
        if not pair.strip():
            continue
        alias, eq, model = (part.strip() for part in pair.partition("="))
        if not (alias and eq and model):
            raise ValueError(f"{pair.strip()!r} is not ALIAS=MODEL")
        out[alias] = model
    return out


class FrontendSettings(SettingsGroup):
    title: ClassVar[str] = "Frontend (HTTP)"
    http_host: str = Field(
        "0.0.0.0",
        description="Address the OpenAI-compatible HTTP server binds.",
        json_schema_extra={"aliases": ["--host"]},
    )
    http_port: int = Field(
        8000,
        description="Port of the HTTP server (0 picks a free one).",
        json_schema_extra={"aliases": ["--port"]},
    )
    max_request_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Largest accepted request body.")
    api_key: SecretStr | None = Field(
        None,
        description="Bearer key(s) clients must send on /v1/* and /tokenize, /detokenize; several "
        "comma-separated. /health, /live, /metrics and /version stay open.",
    )
    tool_call_parser: str | None = Field(
        None,
        description="Parser that turns model text into tool calls for tool_choice=auto: dynvllm's own "
        "(hermes, llama3_json, mistral, pythonic) or any name vLLM registers (vllm:NAME picks vLLM's "
        "where dynvllm has one of the same name).",
    )
    reasoning_parser: str | None = Field(
        None,
        description="Parser that splits reasoning from content: dynvllm's own (qwen3, deepseek_r1) or "
        "any name vLLM registers (vllm:NAME for vLLM's of the same name).",
    )
    tool_parser_plugin: str | None = Field(
        None,
        description="A Python file or module that registers tool parsers with vLLM's ToolParserManager "
        "(as vLLM's --tool-parser-plugin); its names become valid for --tool-call-parser.",
    )
    http_workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        "auto",
        description="Frontend processes sharing the HTTP port (each with its own router, fed by the "
        "same KV events, sharing in-flight load); more use more cores for high request rates. auto: "
        "one per 4 cores this process may use (its CPU quota counted), at most 4, 1 on a host of fewer "
        "than 8 cores, and never more than the cores left after two for each engine `serve` starts "
        "beside it. Stored Responses are shared by every process (through NATS).",
    )
    mm_prompt_template: str | None = Field(
        None,
        description="Prompt for image requests to models whose chat template does not place images, "
        "with <prompt> where the user's text goes, e.g. 'Question: <prompt> Answer:'.",
    )
    trust_request_chat_template: bool = Field(
        False,
        description="Accept a chat_template sent with a chat request (as vLLM, refused without it: a "
        "template is code the frontend runs, in a sandbox).",
    )
    chat_template: str | None = Field(
        None,
        description="Chat template for every model instead of its own: a file, or the template itself "
        "(as vLLM's --chat-template).",
    )
    enable_auto_tool_choice: bool = Field(
        False,
        description="Accepted as vLLM's flag: tool_choice auto is on whenever --tool-call-parser is set "
        "(refused without one, as vLLM does).",
    )
    uvicorn_log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "warning", description="Log level of the HTTP server (uvicorn); requests are not logged one by one."
    )
    ssl_keyfile: Path | None = Field(None, description="Private key file for HTTPS (PEM).")
    ssl_certfile: Path | None = Field(
        None, description="Certificate file for HTTPS (PEM); with it the frontend serves https only."
    )
    allowed_local_media_path: str | None = Field(
        None,
        description="Folders (comma-separated) that file:// image URLs may read from; without it "
        "local files are refused.",
    )
    allow_private_media_urls: bool = Field(
        False, description="Let image URLs point at private, loopback and link-local addresses."
    )
    media_max_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Largest image accepted, in bytes.")
    media_fetch_timeout: float = Field(10.0, gt=0, description="Seconds to fetch one image URL.")
    max_images_per_request: int = Field(8, ge=0, description="Images one request may carry.")
    api_surfaces: str | None = Field(
        None,
        description="APIs the frontend serves, comma-separated plugin names (default: every installed "
        "one; `dynvllm plugins` lists them).",
    )
    model_aliases: str | None = Field(
        None,
        description="Other names clients may use for served models: ALIAS=MODEL pairs separated by "
        "commas, e.g. 'qwen3=Qwen/Qwen3-0.6B'. Aliases are listed in /v1/models.",
    )
    tenants_file: Path | None = Field(
        None,
        description="YAML or JSON file of tenants: each one's API keys and limits (requests/s, tokens/min, "
        "concurrent requests, models). Read again when it changes. The limits hold for the whole service: "
        "frontend processes on one NATS divide them by demand.",
    )
    tenant_sync_interval: float = Field(
        0.1,
        gt=0,
        le=10,
        description="Seconds between the reports frontend processes exchange to divide tenants' limits "
        "(shorter: shares follow demand sooner, for more messages).",
    )
    max_inflight_per_worker: int = Field(
        0,
        ge=0,
        description="Requests the frontend lets through per ready worker of a model; more wait in the "
        "admission queue by priority, tenants in turn (0: no cap; the queue still holds requests "
        "while workers report saturation, see --admission-max-waiting).",
    )
    admission_max_waiting: int | None = Field(
        None,
        ge=0,
        description="Requests a worker's engine may have waiting beyond its running batch, by its load "
        "reports; when every ready worker of a model has that many (counting what this frontend sent "
        "since), requests wait in the admission queue (unset: not checked).",
    )
    admission_max_kv_use: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Share of a worker's KV blocks in use, by its load reports, at which it counts as "
        "saturated for the admission queue, as --admission-max-waiting (unset: not checked).",
    )
    admission_queue_size: int = Field(
        1000, ge=0, description="Requests that may wait in the admission queue; more get a 503 at once."
    )
    admission_timeout: float = Field(
        30.0,
        ge=0,
        description="Seconds a request may wait for a worker slot, or for a worker of a known model that "
        "has none ready (one restarting), before a 503 (0: no waiting).",
    )

    def api_surface_list(self) -> list[str] | None:
        if self.api_surfaces is None:
            return None
        return [s.strip() for s in self.api_surfaces.split(",") if s.strip()]

    def media_roots(self) -> list[str]:
        return [r.strip() for r in (self.allowed_local_media_path or "").split(",") if r.strip()]

    def aliases(self) -> dict[str, str]:
        return alias_pairs(self.model_aliases)

    @field_validator("model_aliases")
    @classmethod
    def _aliases(cls, v: str | None) -> str | None:
        alias_pairs(v)
        return v

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, v: str | None) -> str | None:
        if v is not None:
            from dynvllm.frontend.tokenizer import read_chat_template

            read_chat_template(v)  # a missing file or a broken template stops the start, named
        return v

    @model_validator(mode="after")
    def _parser_names(self) -> FrontendSettings:
        from dynvllm import registry
        from dynvllm.frontend.vllm_parsers import check_name

        plugin = self.tool_parser_plugin
        check_name("tool", self.tool_call_parser, registry.names(registry.TOOL_PARSERS), plugin)
        check_name("reasoning", self.reasoning_parser, registry.names(registry.REASONING_PARSERS), plugin)
        return self

    @model_validator(mode="after")
    def _pairs(self) -> FrontendSettings:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice requires --tool-call-parser (as in vLLM)")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("--ssl-keyfile needs --ssl-certfile (the certificate the key belongs to)")
        for f in (self.ssl_keyfile, self.ssl_certfile):
            if f is not None and not f.is_file():
                raise ValueError(f"{f}: no such file (--ssl-keyfile / --ssl-certfile)")
        return self

    @field_validator("tenants_file")
    @classmethod
    def _tenants(cls, v: Path | None) -> Path | None:
        if v is not None:
            from dynvllm.frontend.tenants import read_file

            read_file(v)  # a bad file stops the start, with the file and the problem named
        return v

    def api_keys(self) -> list[str]:
        raw = self.api_key.get_secret_value() if self.api_key else ""
        return [k.strip() for k in raw.split(",") if k.strip()]

    @field_validator("http_port")
    @classmethod
    def _port(cls, v: int) -> int:
        return check_port(v, allow_zero=True)


class RouterSettings(SettingsGroup):
    title: ClassVar[str] = "Router"
    router: str = Field(
        "kv",
        description="How the frontend picks a worker: "
        "kv (cached prefix from KV events, balanced against load), "
        "kv-approx (predicts caches from its own decisions), round-robin, random, least-loaded.",
    )
    # 8 and 0.5: under cache pressure on a GPU, weight 1 cached 45-54% of prompt tokens where one
    # engine with all the memory cached 77%, weight 8 76%; a decode weight keeps weight 8 from
    # piling a hot prompt's long outputs onto its holder (docs/tuning.md, Router).
    router_prefill_weight: float = Field(
        8.0,
        ge=0,
        description="Cost of prefilling one uncached prompt block relative to holding one active "
        "block (an uncached block also becomes an active one).",
    )
    router_decode_weight: float = Field(
        0.5,
        ge=0,
        le=1,
        description="How much a prompt prefix that requests in flight on a worker share counts per "
        "request in its load: 0 once (the blocks its cache holds), 1 once per request (what every "
        "decode step reads). Above 0, requests on one hot prompt stop piling onto its holder.",
    )
    router_temperature: float = Field(
        0.0, ge=0, description="0 picks the cheapest worker; above 0 samples softmax(-cost/T)."
    )
    router_approx_ttl: float = Field(
        120.0, gt=0, description="Seconds kv-approx assumes a routed prefix stays cached."
    )
    router_predict_ttl: float = Field(
        10.0,
        ge=0,
        description="Seconds the kv router counts a routed prompt's blocks as cached on its worker "
        "before that worker's KV events confirm them, so requests sharing a prefix that is still "
        "being prefilled follow it (0: events only).",
    )
    router_cpu_load_cost: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Cost of loading one prompt block from a worker's CPU offload tier, as a share of "
        "prefilling it (1: the router credits nothing for CPU-resident blocks).",
    )
    router_disk_load_cost: float = Field(
        0.4,
        ge=0,
        le=1,
        description="Cost of loading one prompt block from a worker's disk (storage) offload tier, as a "
        "share of prefilling it (1: the router credits nothing for disk-resident blocks).",
    )
    router_share_load: bool = Field(
        True,
        description="Frontends of a namespace share their routing decisions (in-flight load and "
        "predicted blocks) over NATS, so replicas given the same request choose the same worker.",
    )
    migration_limit: int = Field(
        3,
        ge=0,
        le=100,
        description="Times a stream moves to another worker when its worker dies mid-stream (0: never).",
    )
    lora_on_demand: bool = Field(
        False,
        description="A request for a known adapter that no live worker holds loads it on the least-loaded "
        "worker with room (evicting that worker's least recently used adapter when full) instead of a 404.",
    )

    @field_validator("router")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        # Names from metadata: checking a flag must not import every policy.
        known = registry.names(registry.ROUTER_POLICIES)
        if v not in known:
            raise ValueError(f"unknown router policy {v!r}; choose one of {', '.join(known) or 'none'}")
        return v
