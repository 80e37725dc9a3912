"""A vLLM general plugin: vLLM runs it in every process it starts, model workers included.

On x86 CPUs with AMX, vLLM's CPU attention kernel uses AMX tiles, but Linux lets a process use
them only after it asks (arch_prctl XTILEDATA). oneDNN asks the first time a matmul goes through
AMX, which a multi-token prefill does and a one-token forward does not: an engine whose first
step is a one-token prompt (the worker's health canary, or a user's) dies with SIGILL. Asking
up front, once per process, removes the dependence on what ran first.
"""

from __future__ import annotations


def request_amx() -> None:
    import torch

    cpu = getattr(torch, "cpu", None)
    if cpu is not None and hasattr(cpu, "_init_amx") and cpu._is_amx_tile_supported():
        cpu._init_amx()
