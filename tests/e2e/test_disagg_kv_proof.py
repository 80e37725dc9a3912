"""Proof that NIXL really moves KV: a prefill engine with other weights changes decode output."""

from __future__ import annotations

import shutil

import pytest

from tests.e2e.test_disagg import LONG, SHORT, _complete, reference
from tests.helpers import ENGINE_ARGS, Proc, free_port, wait_http


@pytest.fixture(scope="module")
def expected(tiny_model):
    return dict(zip([LONG[0], SHORT], reference(tiny_model, [LONG[0], SHORT])))


def test_kv_really_moves(tiny_model, nats_url, tmp_path, expected):
    """A prefill engine with different weights in the same folder changes what decode produces."""
    from dynvllm.models.tiny import build_tiny_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("lora"))
    other = build_tiny_model(tmp_path / "other", seed=1)
    ns = "kvproof"
    common = ["--nats-url", nats_url, "--namespace", ns, "--model", str(folder), "--served-model-name", "tiny",
              "--connector", "nixl", *ENGINE_ARGS]
    decode = Proc(["serve", "decode", *common], tmp_path / "decode.log")
    procs = [decode]
    try:
        port = free_port()
        fe = Proc(["frontend", "--nats-url", nats_url, "--namespace", ns, "--disagg-min-prompt-tokens", "40",
                   "--http-host", "127.0.0.1", "--http-port", str(port)], tmp_path / "fe.log")
        procs.append(fe)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", lambda b: b.get("workers") == 1, decode, timeout=300)
        alone = _complete(url, LONG[0])
        assert alone.headers["x-dynvllm-prefill"] == "no_prefill_worker"
        assert alone.json()["choices"][0]["text"] == expected[LONG[0]]
        # Same folder and config, different weights: only transferred KV can carry the difference.
        shutil.copy(other / "model.safetensors", folder / "model.safetensors")
        prefill = Proc(["serve", "prefill", *common], tmp_path / "prefill.log")
        procs.append(prefill)
        wait_http(url + "/health", lambda b: b.get("workers") == 2, prefill, timeout=300)
        moved = _complete(url, LONG[0])
        assert moved.headers["x-dynvllm-prefill"].startswith("remote:")
        assert moved.json()["choices"][0]["text"] != expected[LONG[0]]
        short = _complete(url, SHORT)  # computed by the decode engine alone: its own weights
        assert short.json()["choices"][0]["text"] == expected[SHORT]
    finally:
        for p in reversed(procs):
            p.stop()
