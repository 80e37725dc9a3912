"""`dynvllm serve ROLE`: one subcommand per installed role plugin (read from metadata)."""

from __future__ import annotations

import contextlib
import inspect
import signal
import time
from collections.abc import Iterator
from typing import Any

import typer

from dynvllm.cli.failure import fail as _fail
from dynvllm.cli.options import with_settings
from dynvllm.settings import Settings

_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _check_engine_args(settings: Settings) -> None:
    """Let the engine (vLLM's own parser, for vLLM) judge its arguments before any process starts."""
    from dynvllm import registry

    try:
        registry.load(registry.ENGINES, settings.worker.engine)().check_args(settings)
    except (registry.PluginError, ValueError) as exc:
        raise _fail(str(exc)) from None


def _serve_role(role_name: str, settings: Settings, no_frontend: bool) -> None:
    from dynvllm import registry
    from dynvllm.cli.target import use_service

    try:
        standalone = registry.load(registry.ROLES, role_name).standalone
    except registry.PluginError as exc:
        raise _fail(str(exc)) from None
    if settings.worker.headless and not no_frontend:
        raise _fail("--headless starts engine ranks for a leader elsewhere: add --no-frontend and --nats-url")
    if standalone and not no_frontend:
        _serve_topology(settings, settings.worker.topology() or [(role_name, settings.worker.workers)])
        return
    _checked_roles(settings, [role_name])
    use_service(settings, f"`serve {role_name}` joins a running service: ")
    from dynvllm.worker.service import run_worker

    raise typer.Exit(run_worker(settings, role_name))


def _serve_topology(settings: Settings, topology: list[tuple[str, int]]) -> None:
    with _service_resources(settings, [name for name, _ in topology]):
        _check_topology(_checked_roles(settings, [name for name, _ in topology]), topology)
        _run_service(settings, topology)


@contextlib.contextmanager
def _service_resources(settings: Settings, names: list[str]) -> Iterator[None]:
    """What the topology's roles keep while the service runs (`Role.prepare_service`), released
    once it has stopped, or when it fails to start."""
    import logging

    from dynvllm import registry

    cleanups = []
    try:
        for name in dict.fromkeys(names):
            try:
                cleanup = registry.load(registry.ROLES, name)().prepare_service(settings)
            except registry.PluginError as exc:
                raise _fail(str(exc)) from None
            if cleanup is not None:
                cleanups.append((name, cleanup))
        yield
    finally:
        for name, cleanup in reversed(cleanups):
            try:
                cleanup()
            except Exception:  # the others still run; the operator learns what is left behind
                logging.getLogger("dynvllm.serve").exception("role %r could not release its resources", name)


def _check_topology(roles: list, topology: list[tuple[str, int]]) -> None:
    if not any(r.terminal for r, (_, n) in zip(roles, topology, strict=True) if n > 0):
        names = ", ".join(f"{name}={n}" for name, n in topology)
        raise _fail(
            f"no role of the topology ({names}) ends a request (generates, embeds ...): "
            "add agg, or decode, workers"
        )


def _checked_roles(settings: Settings, names: list[str]) -> list:
    """Load the roles and let them, the engine and vLLM judge the settings before anything starts."""
    from dynvllm import registry
    from dynvllm.cli.target import check_tracing

    if not settings.engine.model:
        raise _fail("no model: pass --model (a Hugging Face id or a local folder) or set DYN_MODEL")
    check_tracing(settings)
    roles = []
    for name in names:
        try:
            role = registry.load(registry.ROLES, name)()
            role.check(settings)
        except (registry.PluginError, ValueError) as exc:
            raise _fail(str(exc)) from None
        roles.append(role)
    asked = [c for c in settings.worker.connectors() if c != "none"] or settings.worker.kv_transfer_config
    if asked and not any(r.kv_role for r in roles):
        flag = "--connector" if settings.worker.connector else "--kv-transfer-config"
        raise _fail(
            f"{flag} configures KV transfer, which only roles that move KV use (prefill, decode); "
            f"{', '.join(sorted(set(names)))} would ignore it: drop it or serve such a role"
        )
    from dynvllm.models.hub import ModelNotFound, check_local

    try:
        check_local(settings.engine.model or "")  # a missing folder is named before vLLM loads
    except ModelNotFound as exc:
        raise _fail(str(exc)) from None
    _check_engine_args(settings)
    return roles


def _run_service(settings: Settings, roles: list[tuple[str, int]]) -> None:
    from rich.console import Console
    from rich.panel import Panel

    from dynvllm import logs
    from dynvllm.models.hub import ModelNotFound, resolve_model
    from dynvllm.supervisor import Service

    logs.setup(settings.runtime.log_level, settings.runtime.log_format, "serve")
    console = Console(stderr=True)
    eng = settings.engine
    assert eng.model
    try:
        # Download once here, with a progress bar, so workers start from the local copy.
        resolve_model(eng.model, eng.revision)
    except ModelNotFound as exc:
        raise _fail(str(exc)) from None
    service = Service(settings, roles)
    what = " + ".join(f"{n} x {r}" for r, n in roles)

    def on_signal(signum: int, frame: object) -> None:
        service.stop_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        service.start()
        with console.status(f"starting {what} worker(s) for {eng.model} ..."):
            ready = service.wait_ready()
        if ready:
            name = eng.served_model_name or eng.model
            console.print(
                Panel.fit(
                    f"[bold]OpenAI API[/]  {service.http_url()}/v1\n[bold]model[/]       {name}\n"
                    f"[bold]workers[/]     {what}\n[bold]NATS[/]        {settings.runtime.nats_url}\n"
                    f"[bold]router[/]      {settings.router.router}\n\nCtrl-C stops every process.",
                    title="dynvllm is serving",
                    border_style="green",
                )
            )
            while not service.stop_requested:
                time.sleep(0.3)
                for line in service.supervise():
                    console.print(line, highlight=False)
                if service.fatal():
                    console.print("[bold red]the frontend or every worker is gone; stopping the service[/]")
                    code = 1
                    break
        elif not service.stop_requested:
            from rich.markup import escape

            failure = escape(service.startup_failure())
            # Unwrapped: the log lines quoted stay whole, as the process printed them.
            console.print(f"[bold red]start-up failed:[/] {failure}", highlight=False, soft_wrap=True)
            console.print("stopping the service")
            code = 1
    finally:
        console.print("stopping ...")
        service.stop()
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    from dynvllm import registry

    serve_app = typer.Typer(help="Start a service or one worker role.", no_args_is_help=True)
    app.add_typer(serve_app, name="serve")
    for role_name in registry.names(registry.ROLES):
        _add_role_command(serve_app, role_name)
    for preset_name in registry.names(registry.PRESETS):
        try:
            preset = registry.load(registry.PRESETS, preset_name)
        except registry.PluginError as exc:  # one broken preset must not take the CLI down
            typer.echo(f"warning: {exc}", err=True)
            continue
        _add_preset_command(serve_app, preset_name, preset)


def _add_role_command(serve_app: typer.Typer, role_name: str) -> None:
    @serve_app.command(
        role_name,
        context_settings=_EXTRA,
        help=f"Serve with `{role_name}` workers. A role that serves requests on its own starts "
        "NATS (unless --nats-url), the frontend and --workers workers (or the --roles topology); "
        "other roles, and --no-frontend, start one worker that joins a service. "
        "Unknown --options pass to vLLM. As with `vllm serve`, the model may come first "
        "(`serve ROLE MODEL`), --served-model-name may give several names and --config FILE.yaml "
        "reads flags from a file (the command line's own win).",
    )
    @with_settings("runtime", "frontend", "router", "worker", "engine", plugins=True)
    def _cmd(
        ctx: typer.Context,
        settings: Settings,
        no_frontend: bool = typer.Option(
            False, "--no-frontend", help="Start one worker only; join via --nats-url."
        ),
    ) -> None:
        _serve_role(role_name, settings, no_frontend)


def _count_key(role: str) -> str:
    return "count_" + role.replace("-", "_")


def _add_preset_command(serve_app: typer.Typer, preset_name: str, preset: Any) -> None:
    """`serve NAME` for a preset: its roles with a `--ROLE N` count flag each (CLI sugar over --roles)."""
    counts = [
        inspect.Parameter(
            _count_key(role),
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                None, f"--{role}", min=0, max=256, help=f"{role} workers (default {n}).", show_default=False
            ),
            annotation=int | None,
        )
        for role, n in preset.roles.items()
    ]

    def _cmd(ctx: typer.Context, settings: Settings, **flags: Any) -> None:
        def count(role: str, default: int) -> int:
            given = flags.get(_count_key(role))
            return default if given is None else given

        _serve_topology(
            settings, settings.worker.topology() or [(r, count(r, n)) for r, n in preset.roles.items()]
        )

    own = [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        inspect.Parameter("settings", inspect.Parameter.KEYWORD_ONLY, annotation=Settings),
    ]
    # inspect reads __signature__ from any callable; typeshed's function type does not declare it.
    _cmd.__signature__ = inspect.Signature(own + counts)  # type: ignore[attr-defined]
    command = with_settings("runtime", "frontend", "router", "worker", "engine", plugins=True)(_cmd)
    serve_app.command(
        preset_name,
        context_settings=_EXTRA,
        help=f"{preset.description} Roles: "
        + ", ".join(f"{r} x {n}" for r, n in preset.roles.items())
        + ". --roles replaces the counts. Unknown --options pass to vLLM.",
    )(command)
