"""Shared fixtures: a real nats-server, tiny models built once per session, free ports."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_state(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Tests never read or write the user's record of a running service.
    os.environ["DYN_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_processes():
    """Every process a test started is gone by the end of the session (engines included)."""
    import time

    import psutil

    yield
    me = psutil.Process()
    deadline = time.monotonic() + 20
    left = []
    while time.monotonic() < deadline:
        left = [p for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
        if not left:
            return
        time.sleep(0.5)
    names = [(p.pid, p.name()) for p in left]
    for p in left:
        p.kill()
    raise AssertionError(f"processes left behind by the tests: {names}")


@pytest.fixture(scope="session")
def nats_url(_no_leftover_processes):
    from dynvllm.runtime.nats import EmbeddedNats

    server = EmbeddedNats()
    server.start()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dynvllm.models.tiny import build_tiny_lora, build_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(path, seed=0)
    build_tiny_lora(path, path / "lora", seed=0)
    return path


@pytest.fixture(scope="session")
def references(tiny_model: Path) -> dict[str, list]:
    """vLLM's offline outputs of the plain tiny model for every module's `want_reference`."""
    from tests.helpers import PLAIN_REFERENCES, offline_reference

    wanted = dict(PLAIN_REFERENCES)
    out = offline_reference(tiny_model, [r for reqs in wanted.values() for r in reqs])
    by_name, at = {}, 0
    for name, reqs in wanted.items():
        by_name[name], at = out[at : at + len(reqs)], at + len(reqs)
    return by_name


def dynvllm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dynvllm", *args]
