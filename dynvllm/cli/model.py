"""`dynvllm model ...`: model helpers."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    model_app = typer.Typer(help="Model helpers.", no_args_is_help=True)
    app.add_typer(model_app, name="model")

    @model_app.command("tiny")
    def tiny(
        path: Path = typer.Argument(..., metavar="PATH", help="Folder to write the model into."),
        seed: int = typer.Option(0, help="Seed for weights and tokenizer corpus."),
        lora: bool = typer.Option(False, "--lora", help="Also write a LoRA adapter to PATH/lora."),
        vision: bool = typer.Option(
            False, "--vision", help="A tiny BLIP-2 (images in, text out) instead of the text model."
        ),
        classify: bool = typer.Option(
            False,
            "--classify",
            help="A tiny Qwen2ForSequenceClassification for `serve embed` and /classify.",
        ),
        labels: int = typer.Option(
            3,
            "--labels",
            min=1,
            max=3,
            help="The classifier's labels (with --classify): 3 (red, green, blue), or 1 for a "
            "cross-encoder that /score and /rerank score text pairs with.",
        ),
    ) -> None:
        """Build a tiny random Qwen2 model (and tokenizer) that vLLM runs in seconds."""
        import os

        from dynvllm.cli.failure import fail as _fail

        if (vision or classify) and lora:
            raise typer.BadParameter("--lora goes with the text model only", param_hint="--lora")
        if vision and classify:
            raise typer.BadParameter("choose one of --vision and --classify", param_hint="--classify")
        if labels != 3 and not classify:
            raise typer.BadParameter("--labels goes with --classify", param_hint="--labels")
        # Before the heavy imports and the build: a folder that cannot be written is one line.
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _fail(f"cannot create the folder {path}: {exc.strerror or exc}") from None
        if not os.access(path, os.W_OK):
            raise _fail(f"cannot write into the folder {path}: permission denied")
        from dynvllm.models.tiny import build_tiny_classifier, build_tiny_lora, build_tiny_model

        if classify:
            build_tiny_classifier(path, seed=seed, labels=labels)
            kind = "cross-encoder" if labels == 1 else f"{labels} labels"
            typer.echo(f"tiny classifier (Qwen2ForSequenceClassification, {kind}) written to {path}")
            return
        if vision:
            from dynvllm.models.tiny_vision import build_tiny_vision_model

            build_tiny_vision_model(path, seed=seed)
            typer.echo(f"tiny vision model (BLIP-2) written to {path}")
            return
        build_tiny_model(path, seed=seed)
        typer.echo(f"tiny model written to {path}")
        if lora:
            build_tiny_lora(path, path / "lora", seed=seed)
            typer.echo(f"tiny LoRA adapter written to {path / 'lora'}")
