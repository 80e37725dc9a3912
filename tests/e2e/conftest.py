from __future__ import annotations

import pytest

from tests.helpers import ENGINE_ARGS, Proc, free_port, wait_http


@pytest.fixture(scope="session")
def agg_service(tiny_model, tmp_path_factory):
    """`dynvllm serve agg` with one tiny-model worker, shared by the read-only API tests."""
    port = free_port()
    log = tmp_path_factory.mktemp("agg") / "serve.log"
    proc = Proc(
        [
            "serve",
            "agg",
            "--model",
            str(tiny_model),
            "--served-model-name",
            "tiny",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(port),
            "--namespace",
            "e2e",
            *ENGINE_ARGS,
        ],
        log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", lambda b: b.get("workers") == 1, proc)
        yield url, proc
    finally:
        proc.stop()
