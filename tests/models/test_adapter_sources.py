"""Adapter sources: allowed schemes and roots; no traversal, no symlink escape (pure, local files)."""

from __future__ import annotations

import json
import os

import pytest

from dynvllm.models.adapter_sources import Source, SourceError, parse_source, resolve


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "adapters"
    (root / "good").mkdir(parents=True)
    (root / "good" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")
    (root / "link").symlink_to(outside)
    (root / "empty").mkdir()
    return root, outside


def test_parse_sources():
    assert parse_source("/a/b") == Source("file", "/a/b")
    assert parse_source("file:///a/b") == Source("file", "/a/b")
    assert parse_source("hf://org/repo@v1") == Source("hf", "org/repo", "v1")
    assert parse_source("hf://org/repo") == Source("hf", "org/repo", None)
    assert parse_source("s3://bucket/some/prefix/") == Source("s3", "bucket/some/prefix")
    for bad, needle in [("hf://repo", "hf://org/repo"), ("ftp://x/y", "unsupported"), ("", "empty")]:
        with pytest.raises(SourceError, match=needle):
            parse_source(bad)


def test_local_folders_only_under_allowed_roots(roots):
    root, outside = roots
    good = resolve(str(root / "good"), [str(root)], ["file"], "")
    assert good == (root / "good").resolve()
    assert resolve(f"file://{root}/good", [str(root)], ["file"], "") == good
    cases = [
        (str(root / ".." / "secret"), "outside the allowed roots"),  # traversal
        (str(root / "link"), "outside the allowed roots"),  # a symlink pointing out
        (str(outside), "outside the allowed roots"),
        (str(root / "empty"), "no adapter_config.json"),
        (str(root / "missing"), "no adapter_config.json"),
    ]
    for path, needle in cases:
        with pytest.raises(SourceError, match=needle):
            resolve(path, [str(root)], ["file"], "")
    with pytest.raises(SourceError, match="--lora-roots"):
        resolve(str(root / "good"), [], ["file"], "")


def test_schemes_must_be_allowed(roots, monkeypatch):
    root, _ = roots
    with pytest.raises(SourceError, match=r"file:// adapter sources are not allowed here \(allowed: hf\)"):
        resolve(str(root / "good"), [str(root)], ["hf"], "")
    with pytest.raises(SourceError, match="not allowed"):
        resolve("s3://bucket/x", [], ["file", "hf"], "")
    monkeypatch.setitem(__import__("sys").modules, "boto3", None)  # as if boto3 were not installed
    with pytest.raises(SourceError, match="pip install boto3"):
        resolve("s3://bucket/x", [], ["s3"], "")


def test_hub_sources_fail_clearly_offline(tmp_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    with pytest.raises(SourceError, match="cannot download 'hf://org/nothing'"):
        resolve("hf://org/nothing", [], ["hf"], str(tmp_path))
