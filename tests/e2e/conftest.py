from __future__ import annotations

import pytest

from tests.helpers import start_agg, wait_http


@pytest.fixture(scope="session")
def agg_service(tiny_model, tmp_path_factory):
    """`dynvllm serve agg` with one tiny-model worker, shared by the read-only API tests."""
    url, proc = start_agg(tiny_model, tmp_path_factory.mktemp("agg") / "serve.log", "e2e")
    try:
        wait_http(url + "/health", lambda b: b.get("workers") == 1, proc)
        yield url, proc
    finally:
        proc.stop()
