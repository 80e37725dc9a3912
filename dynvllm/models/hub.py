"""Resolve a model argument to a local folder, downloading from the Hugging Face hub if needed."""

from __future__ import annotations

import os
from pathlib import Path

TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
]


class ModelNotFound(RuntimeError):
    pass


def is_local(model: str) -> bool:
    return Path(model).expanduser().is_dir()


def looks_like_path(model: str) -> bool:
    """A name no hub id can be ('org/name' at most, no leading '/', '.' or '~'): a local path."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model)


def check_local(model: str) -> None:
    """`ModelNotFound` for a local path that is no model folder, said as such: asking the hub for
    it would answer with a repo-id error that hides the cause."""
    path = Path(model).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ModelNotFound(f"model {model!r} is a file; give the folder that holds its config.json")
    if looks_like_path(model):
        raise ModelNotFound(f"the model folder {model!r} does not exist")


def resolve_model(model: str, revision: str | None = None, tokenizer_only: bool = False) -> str:
    """A local folder for `model`; hub ids download with a progress bar (huggingface-hub's)."""
    if is_local(model):
        return str(Path(model).expanduser().resolve())
    check_local(model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    enable_progress_bars()
    patterns = (
        TOKENIZER_FILES
        if tokenizer_only
        else ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    )
    try:
        return snapshot_download(repo_id=model, revision=revision, allow_patterns=patterns)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set: only cached models are available)" if offline else ""
        raise ModelNotFound(
            f"model {model!r} is neither a local folder nor downloadable from the Hugging Face hub{hint}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        disable_progress_bars()
