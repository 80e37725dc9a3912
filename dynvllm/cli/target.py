"""Which running service a command talks to, and `dynvllm services`: the services of this host.

A command given --nats-url (or DYN_NATS_URL) uses it; otherwise it takes the one service this
host's `serve` processes recorded (of --namespace, when given). Several is an error that lists
them: a command never picks one silently.
"""

from __future__ import annotations

import json

import typer

from dynvllm.settings import Settings


def use_service(settings: Settings, what: str = "") -> None:
    """Point `settings.runtime` at the service to talk to (exit 2 with the reason if none or
    several); `what` prefixes the message (`serve decode` joins a running service: ...)."""
    from dynvllm.cli.failure import fail as _fail
    from dynvllm.runtime import state

    rt = settings.runtime
    try:
        rt.nats_url, rt.namespace = state.resolve(
            rt.nats_url, rt.namespace, "namespace" in rt.model_fields_set
        )
    except LookupError as exc:
        raise _fail(f"{what}{exc}") from None


def check_tracing(settings: Settings) -> None:
    """With --otlp-traces-endpoint, OpenTelemetry must be installed: said before anything starts."""
    from dynvllm.cli.failure import fail as _fail
    from dynvllm.tracing import TracingUnavailable, check_available

    if settings.runtime.otlp_traces_endpoint:
        try:
            check_available()
        except TracingUnavailable as exc:
            raise _fail(str(exc)) from None


def register(app: typer.Typer) -> None:
    @app.command("services")
    def services_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """List the services `dynvllm serve` runs on this machine; stale ones (NATS gone) are marked."""
        from dynvllm.runtime import state

        rows = state.records()
        if as_json:
            typer.echo(
                json.dumps(
                    [
                        {
                            "namespace": r.namespace,
                            "nats_url": r.nats_url,
                            "http_port": r.http_port,
                            "pid": r.pid,
                            "stale": r.stale or None,
                        }
                        for r in rows
                    ],
                    indent=2,
                )
            )
            return
        if not rows:
            typer.echo("no service recorded on this machine")
        for r in rows:
            typer.echo(r.describe())
