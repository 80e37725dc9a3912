"""`dynvllm frontend`: the OpenAI HTTP frontend alone, joining a service through NATS."""

from __future__ import annotations

import typer

from dynvllm.cli.options import with_settings
from dynvllm.settings import Settings


def register(app: typer.Typer) -> None:
    @app.command("frontend")
    @with_settings("runtime", "frontend", "router", plugins=True)
    def frontend_cmd(settings: Settings) -> None:
        """Start the OpenAI-compatible frontend and router; workers join through NATS."""
        from dynvllm.cli.serve import _fail
        from dynvllm.frontend.server import run_frontend
        from dynvllm.runtime import state

        try:
            settings.runtime.nats_url = state.resolve_nats_url(
                settings.runtime.nats_url, settings.runtime.namespace
            )
        except LookupError as exc:
            raise _fail(str(exc)) from None
        raise typer.Exit(run_frontend(settings))
