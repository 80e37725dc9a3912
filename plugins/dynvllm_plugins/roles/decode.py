"""Decode role: generates from KV a prefill worker computed (KV consumer); computes the prompt
itself when no prefill result comes with the request."""

from __future__ import annotations

from dynvllm.worker.role import Role


class DecodeRole(Role):
    description = "Decode worker: generates from KV handed over by prefill workers."
    kv_role = "kv_consumer"
    default_connectors = ("nixl",)
