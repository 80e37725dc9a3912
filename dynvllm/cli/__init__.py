"""The `dynvllm` command. Heavy imports (vLLM, torch, transformers) happen inside commands."""

from __future__ import annotations

import typer

from dynvllm import __version__

app = typer.Typer(
    name="dynvllm",
    help="Serve vLLM models as a distributed service: OpenAI frontend, KV-aware router, vLLM workers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dynvllm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version."
    ),
) -> None:
    """dynvllm command line."""


def _register() -> None:
    from dynvllm.cli import frontend, lora, model, operations, planner, plugins, serve, status, target

    plugins.register(app)
    model.register(app)
    serve.register(app)
    status.register(app)
    target.register(app)
    frontend.register(app)
    lora.register(app)
    operations.register(app)
    planner.register(app)


_register()


def main() -> None:
    import sys

    from dynvllm.cli.vllm_cmdline import CommandLineError, normalize

    try:
        # `vllm serve` forms (positional model, several served names, --config) as dynvllm's flags.
        argv = normalize(sys.argv[1:])
    except CommandLineError as exc:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        raise SystemExit(2) from None
    app(args=argv, prog_name="dynvllm")
