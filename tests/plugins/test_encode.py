"""The encode role owns its shared folder: the service hook makes one when none is given and
removes it when the service ends; its settings group reaches the engine configuration."""

from __future__ import annotations

import os

import pytest

from dynvllm import settings as S
from dynvllm_plugins.roles import encoder_cache
from dynvllm_plugins.roles.encode import PRIVATE_FOLDER_PREFIX, EncodeRole
from dynvllm_plugins.roles.encoder_cache import EncoderCacheSettings


def test_the_service_hook_makes_and_removes_a_private_folder():
    settings = S.build_settings()
    cleanup = EncodeRole().prepare_service(settings)
    folder = settings.plugin(EncoderCacheSettings).encoder_cache_dir
    assert cleanup is not None and folder and os.path.isdir(folder)
    assert os.path.basename(folder).startswith(PRIVATE_FOLDER_PREFIX)
    # Children get it with the rest of the settings.
    assert S.Settings.from_json(settings.to_json()).plugin("encode").encoder_cache_dir == folder
    open(os.path.join(folder, "embedding"), "w").close()
    cleanup()
    assert not os.path.exists(folder)


def test_a_given_folder_is_the_operators(tmp_path):
    settings = S.build_settings({"encode": {"encoder_cache_dir": str(tmp_path)}})
    assert EncodeRole().prepare_service(settings) is None
    assert settings.plugin("encode").encoder_cache_dir == str(tmp_path) and tmp_path.is_dir()


def test_a_joining_encode_worker_needs_the_shared_folder():
    with pytest.raises(ValueError, match="needs --encoder-cache-dir"):
        EncodeRole().check(S.build_settings({"worker": {"engine": "vllm"}}))


def test_without_a_folder_no_role_configures_the_encoder_cache():
    # Nothing to hand over: vLLM is not even imported for it.
    assert encoder_cache.engine_overrides(S.build_settings()) == {}
