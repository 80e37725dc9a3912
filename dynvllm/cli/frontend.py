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
        from dynvllm.cli.target import check_tracing, use_service
        from dynvllm.frontend.server import run_frontend

        check_tracing(settings)
        use_service(settings, "`frontend` joins a running service: ")
        raise typer.Exit(run_frontend(settings))
