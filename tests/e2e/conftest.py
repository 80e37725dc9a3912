from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable

import openai
import pytest

from tests.helpers import COMPACT, start_service, stop_in_background

#: Session fixtures that hold engines shared by several modules. Those modules run one after
#: another (in their usual order, where the first of them would run) and the service stops after
#: the last test that uses it, so idle engines do not sit beside later modules' engines.
SHARED = ("agg_service",)
_last_user: dict[str, str] = {}
_stoppers: dict[str, Callable[[], None]] = {}


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for name in SHARED:
        users = {_module(it) for it in items if name in getattr(it, "fixturenames", ())}
        grouped = [it for it in items if _module(it) in users]
        if not grouped:
            continue
        at = items.index(grouped[0])
        rest = [it for it in items if _module(it) not in users]
        items[:] = rest[:at] + grouped + rest[at:]


def pytest_collection_finish(session: pytest.Session) -> None:
    for name in SHARED:
        for it in session.items:
            if name in getattr(it, "fixturenames", ()):
                _last_user[name] = it.nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    yield
    for name, stop in list(_stoppers.items()):
        if _last_user.get(name) == item.nodeid:
            del _stoppers[name]
            stop()


@pytest.fixture(scope="session")
def agg_service(request, tiny_model, tmp_path_factory):
    """`dynvllm serve agg --workers 2` on the tiny model in namespace "e2e", shared by the API,
    routing, multimodal, extras and migration tests (their tests leave it as they found it, but
    for migration's killed worker, which `serve` restarts). Its engines keep structured JSON
    compact, for the extras tests.

    Readiness is checked from the first moment: a request sent as soon as the model is listed
    must succeed, while the second worker may still be starting."""
    if any("references" in it.fixturenames for it in request.session.items):
        request.getfixturevalue("reference_job")  # vLLM's offline engine starts beside the service's
    proc = start_service(
        ["serve", "agg"],
        tmp_path_factory.mktemp("agg") / "serve.log",
        "--structured-outputs-config",
        json.dumps(COMPACT),
        "--router",
        "kv",
        model=tiny_model,
        namespace="e2e",
        workers=2,
    )
    url = proc.url
    assert url
    _stoppers["agg_service"] = lambda: stop_in_background([proc])
    try:
        first_ok = None
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and first_ok is None:
            assert proc.p.poll() is None, proc.tail()
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                    listed = [m["id"] for m in json.load(r)["data"]]
            except OSError:
                listed = []
            if "tiny" in listed:
                client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
                first_ok = client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].text
            time.sleep(0.05)
        assert first_ok is not None, proc.tail()
        while json.load(urllib.request.urlopen(url + "/health"))["workers"] < 2:
            assert time.monotonic() < deadline and proc.p.poll() is None, proc.tail()
            time.sleep(0.2)
        yield url, proc
    finally:
        if _stoppers.pop("agg_service", None) is not None:  # not stopped after its last user yet
            proc.stop()
