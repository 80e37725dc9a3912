"""Which model names are local paths: those are never looked up on the hub (pure)."""

from __future__ import annotations

import pytest

from dynvllm.models.hub import ModelNotFound, check_local, looks_like_path


@pytest.mark.parametrize("name", ["/models/qwen", "./qwen", "../qwen", "~/qwen", "a/b/c"])
def test_paths(name):
    assert looks_like_path(name)


@pytest.mark.parametrize("name", ["Qwen/Qwen3-0.6B", "gpt2", "org/name.v2"])
def test_hub_ids(name):
    assert not looks_like_path(name)
    check_local(name)  # not a path here: left to the hub


def test_check_local(tmp_path):
    check_local(str(tmp_path))
    with pytest.raises(ModelNotFound, match="does not exist"):
        check_local(str(tmp_path / "nope"))
    (tmp_path / "f").write_text("x")
    with pytest.raises(ModelNotFound, match="is a file"):
        check_local(str(tmp_path / "f"))
