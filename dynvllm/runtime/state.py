"""Where `dynvllm serve` records its NATS address, so a second terminal finds the service."""

from __future__ import annotations

import json
import os
from pathlib import Path


def state_dir() -> Path:
    base = os.environ.get("DYN_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "dynvllm"
    )
    return Path(base)


def _file(namespace: str) -> Path:
    return state_dir() / f"{namespace}.json"


def record(namespace: str, **info: object) -> Path:
    path = _file(namespace)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**info, "pid": os.getpid()}))
    tmp.replace(path)
    return path


def forget(namespace: str) -> None:
    path = _file(namespace)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def lookup(namespace: str) -> dict | None:
    """The recorded service, if its `serve` process is still alive."""
    try:
        info = json.loads(_file(namespace).read_text())
        os.kill(int(info["pid"]), 0)
        return info
    except (OSError, ValueError, KeyError):
        return None


def resolve_nats_url(explicit: str | None, namespace: str) -> str:
    if explicit:
        return explicit
    info = lookup(namespace)
    if info and info.get("nats_url"):
        return str(info["nats_url"])
    raise LookupError(
        "no NATS address: pass --nats-url (or set DYN_NATS_URL), or start a service on this "
        f"machine with `dynvllm serve` (namespace {namespace!r})"
    )
