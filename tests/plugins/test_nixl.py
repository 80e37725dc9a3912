"""What the NIXL connector needs of the engine besides its transfer configuration, asked of the
connector plugin (the core names no connector), for --connector and for a raw
--kv-transfer-config alike."""

from __future__ import annotations

import json

from dynvllm import settings as S
from dynvllm.worker.connector import connector_engine_overrides

MP = {"distributed_executor_backend": "mp"}


def test_nixl_moves_a_single_engine_out_of_process():
    s = S.build_settings()
    assert connector_engine_overrides(["nixl"], "kv_producer", s) == MP
    assert connector_engine_overrides(["lmcache"], "kv_producer", s) == {}


def test_an_explicit_executor_or_tensor_parallelism_is_left_alone():
    s = S.build_settings({}, ["--distributed-executor-backend", "uni"])
    assert connector_engine_overrides(["nixl"], "kv_producer", s) == {}
    s = S.build_settings({"engine": {"tensor_parallel_size": 2}})
    assert connector_engine_overrides(["nixl"], "kv_consumer", s) == {}


def test_a_raw_transfer_config_is_matched_by_the_connectors_vllm_name():
    multi = {
        "kv_connector": "MultiConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"connectors": [{"kv_connector": "NixlConnector"}]},
    }
    s = S.build_settings({"worker": {"kv_transfer_config": json.dumps(multi)}})
    assert connector_engine_overrides([], "kv_both", s) == MP
    other = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
    s = S.build_settings({"worker": {"kv_transfer_config": json.dumps(other)}})
    assert connector_engine_overrides([], "kv_both", s) == {}
