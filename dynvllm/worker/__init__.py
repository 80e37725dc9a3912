"""The worker process: one vLLM engine in a role, served over the runtime."""
