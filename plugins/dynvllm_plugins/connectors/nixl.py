"""NIXL: prefill engines hand KV blocks to decode engines (UCX; CPU buffers on CPU hosts)."""

from __future__ import annotations

import os
from typing import Any

from dynvllm.ports import reserve_for_process
from dynvllm.worker.connector import Connector


def _buffer_device() -> str:
    """Where NIXL's KV buffers live: the accelerator, or host memory on CPU-only hosts.

    Asked of vLLM's platform detection (NVML), not torch.cuda: initializing CUDA in the worker
    process would make every engine process vLLM forks after it fail to use the GPU.
    """
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else current_platform.device_type


class NixlConnector(Connector):
    produces_transfer_params = True
    package = "nixl"
    install_hint = "nixl==1.5.1 nixl-cu12==1.5.1 --no-deps"
    kv_connector = "NixlConnector"

    def vllm_config(self, kv_role: str, settings: Any) -> dict | None:
        return {
            "kv_connector": self.kv_connector,
            "kv_role": kv_role,
            "kv_buffer_device": _buffer_device(),
        }

    def worker_env(self, kv_role: str, settings: Any) -> dict[str, str]:
        from dynvllm.runtime.nats import advertised_host

        # Each engine needs its own side channel; hold a free one for it (this worker process
        # lives as long as its engine) unless the operator fixed it. Decode engines dial it at
        # the host the prefill engine announces in its transfer parameters; vLLM's default,
        # "localhost", is wrong as soon as they are apart.
        port = os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT") or reserve_for_process()
        return {
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(port),
            "VLLM_NIXL_SIDE_CHANNEL_HOST": os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST")
            or advertised_host(settings.runtime),
        }

    def engine_overrides(self, kv_role: str, settings: Any) -> dict[str, Any]:
        single = (settings.engine.tensor_parallel_size or 1) == 1
        if single and "--distributed-executor-backend" not in settings.vllm_argv():
            # NIXL's hand-shake stalls behind the GIL with the in-process executor.
            return {"distributed_executor_backend": "mp"}
        return {}


class NixlPushConnector(NixlConnector):
    """The same hand-off with the prefill engine writing into the decode engine's blocks.

    Decode engines register their blocks with the prefill engine, which WRITEs the KV. On engines
    that share a host without RDMA (two engines on one GPU, or GPUs without NVLink) UCX's
    cuda_ipc transport serves remote writes at device speed but remote reads only through TCP
    emulation, which is what the pull mode issues (vllm#52607).
    """

    kv_connector = "NixlPushConnector"
