"""Named topologies (entry-point group `dynvllm.presets`): `dynvllm serve NAME` starts them."""

from __future__ import annotations

from dynvllm.worker.role import Preset

DISAGG = Preset(
    description="Disaggregated service: NATS (unless --nats-url), the frontend, prefill and decode "
    "workers exchanging KV through --connector (default nixl).",
    roles={"prefill": 1, "decode": 1},
)
