"""Shared fixtures: a real nats-server, tiny models built once per session, vLLM's offline outputs."""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


#: Modules whose engines take longest, first: with several test processes (`-n`, see
#: scripts/test.sh) a scope is handed out whole, so the long ones start early and the short ones
#: fill the gaps at the end.
LONGEST_FIRST = (
    "tests/e2e/test_multimodal.py",
    "tests/e2e/test_launch.py",
    "tests/e2e/test_data_parallel.py",
    "tests/e2e/test_lora.py",
    "tests/e2e/test_disagg.py",
    "tests/e2e/test_planner.py",
    "tests/e2e/test_multihost.py",
    "tests/e2e/test_lifecycle.py",
    "tests/e2e/test_embeddings.py",
    "tests/e2e/test_plugin_example.py",
)


@functools.cache
def _shared_users() -> frozenset[str]:
    """Test modules that use a session engine of tests/e2e/conftest.py (SHARED), by path."""
    from tests.e2e.conftest import SHARED

    found = set()
    for path in (REPO / "tests").rglob("test_*.py"):
        text = path.read_text()
        if any(re.search(rf"\b{name}\b", text) for name in SHARED):
            found.add(path.relative_to(REPO).as_posix())
    return frozenset(found)


def _scope(nodeid: str) -> str:
    """What one test process runs whole: a module (its module fixtures start their engines
    once), or every module sharing a session engine."""
    module = nodeid.split("::")[0]
    return "shared" if module in _shared_users() else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """With several test processes (`-n`, see scripts/test.sh) tests are handed out by `_scope`."""
    from xdist.scheduler import LoadScopeScheduling

    class ByScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return ByScope(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Scopes are handed out in collection order: the longest first, in xdist's processes only.
    if not hasattr(config, "workerinput"):
        return
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    scope_rank: dict[str, int] = {}
    for item in items:
        scope, r = _scope(item.nodeid), rank.get(item.nodeid.split("::")[0], len(rank))
        scope_rank[scope] = min(scope_rank.get(scope, r), r)
    items.sort(key=lambda item: scope_rank[_scope(item.nodeid)])


@pytest.fixture(scope="session", autouse=True)
def _isolated_state(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Tests never read or write the user's record of a running service.
    os.environ["DYN_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # vLLM's CPU engines bind their compute threads by default ("auto"): on a 2-core host every
    # engine pins to core 0 and keeps core 1 for its scheduler, so the tests' engines (several at
    # once) all queued on one core. One unbound thread each lets them share both cores.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # One frontend process whatever the host's cores (the default, auto, gives several on 8 or
    # more): tests that want more ask for them.
    os.environ.setdefault("DYN_HTTP_WORKERS", "1")


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_processes():
    """Every process a test started is gone by the end of the session (engines included)."""
    import time

    import psutil

    from tests.helpers import wait_background_stops

    yield
    wait_background_stops()
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
def reference_job(tiny_model: Path):
    """The child computing vLLM's offline outputs of the tiny model for every module's
    `want_reference`, started when first asked for (a shared service asks early, so that this
    engine starts while the service's engines do)."""
    from tests.helpers import PLAIN_REFERENCES, REFERENCE_ENGINE, OfflineReference

    wanted = dict(PLAIN_REFERENCES)
    job = OfflineReference(tiny_model, [r for reqs in wanted.values() for r in reqs], REFERENCE_ENGINE)
    yield wanted, job
    job.close()


@pytest.fixture(scope="session")
def references(reference_job) -> dict[str, list]:
    """vLLM's offline outputs by the name `want_reference` returned."""
    wanted, job = reference_job
    out = job.result()
    by_name, at = {}, 0
    for name, reqs in wanted.items():
        by_name[name], at = out[at : at + len(reqs)], at + len(reqs)
    return by_name


def dynvllm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dynvllm", *args]
