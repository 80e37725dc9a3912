"""Headless data-parallel ranks find the worker that leads their engine in discovery."""

from __future__ import annotations

from dynvllm.runtime.discovery import Instance
from dynvllm.worker.headless import leader_of


def _inst(iid: str, component: str = "worker", **card) -> Instance:
    return Instance(id=iid, component=component, card=card)


def test_the_leader_is_the_worker_at_the_engines_address_and_rpc_port():
    instances = [
        _inst("fe", component="frontend", dp_address="10.0.0.1", dp_rpc_port=1234),
        _inst("plain"),  # no data-parallel engine
        _inst("other-port", dp_address="10.0.0.1", dp_rpc_port=999),
        _inst("other-host", dp_address="10.0.0.2", dp_rpc_port=1234),
        _inst("leader", dp_address="10.0.0.1", dp_rpc_port=1234),
    ]
    assert leader_of(instances, "10.0.0.1", 1234).id == "leader"
    assert leader_of(instances, "10.0.0.3", 1234) is None
    assert leader_of([], "10.0.0.1", 1234) is None
