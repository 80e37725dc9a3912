"""KV-connector configuration a prefill/decode worker hands to vLLM (no engine started).
tests/cli/test_cli.py covers NIXL's own entry and the MultiConnector of two plugins."""

from __future__ import annotations

import pytest

from dynvllm.settings import build_settings
from dynvllm.worker.connector import Connector, ConnectorError, _vllm_names, check_installed, transfer_config


def _config(kv_role: str, **worker) -> tuple:
    s = build_settings({"worker": worker})
    return transfer_config(s.worker.connectors(), kv_role, s)


def test_one_plugin_gives_its_own_entry(monkeypatch, tmp_path):
    monkeypatch.setenv("DYN_EXAMPLE_CONNECTOR_PATH", str(tmp_path))
    cfg, env, produces = _config("kv_consumer", connector="example")
    assert cfg == {
        "kv_connector": "ExampleConnector",
        "kv_role": "kv_consumer",
        "kv_connector_extra_config": {"shared_storage_path": str(tmp_path)},
    }
    assert env == {} and produces is False


def test_no_transfer_without_a_connector():
    assert _config("kv_producer", connector="none") == (None, {}, False)


def test_a_raw_transfer_config_passes_through_as_given():
    raw = '{"kv_connector": "SomeConnector", "kv_role": "kv_both", "kv_connector_extra_config": {"a": 1}}'
    cfg, env, produces = _config("kv_producer", kv_transfer_config=raw)
    assert cfg == {
        "kv_connector": "SomeConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"a": 1},
    }
    # Nothing says whether it produces transfer parameters: the frontend passes them on.
    assert env == {} and produces is True


@pytest.mark.parametrize(
    ("raw", "needle"),
    [("{bad", "not valid JSON"), ("[1, 2]", "must be a JSON object"), ('"x"', "JSON object")],
)
def test_a_raw_transfer_config_that_is_not_an_object_is_refused(raw, needle):
    s = build_settings({})
    s.worker.kv_transfer_config = raw  # as a plugin might set it, after the CLI's own check
    with pytest.raises(ConnectorError, match=needle):
        transfer_config([], "kv_producer", s)


def test_unknown_connectors_are_named():
    s = build_settings({})
    with pytest.raises(ConnectorError, match="warp"):
        transfer_config(["warp"], "kv_producer", s)


def test_a_missing_package_says_what_to_install():
    class Needy(Connector):
        package = "no_such_package_for_dynvllm_tests"
        install_hint = "no-such-package==1.0"

    with pytest.raises(ConnectorError, match=r"'needy'.*pip install no-such-package==1\.0"):
        check_installed("needy", Needy())
    check_installed("plain", Connector())  # ships with vLLM: nothing to check


def test_vllm_names_include_the_parts_of_a_multi_connector():
    multi = {
        "kv_connector": "MultiConnector",
        "kv_connector_extra_config": {
            "connectors": [{"kv_connector": "NixlConnector"}, {"kv_connector": "LMCacheConnectorV1"}]
        },
    }
    assert _vllm_names(multi) == {"MultiConnector", "NixlConnector", "LMCacheConnectorV1"}
    assert _vllm_names({"kv_role": "kv_both"}) == set() and _vllm_names([1]) == set()
