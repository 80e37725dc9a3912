"""dynvllm: serve vLLM models as a distributed service."""

__version__ = "0.1.0"
