"""An example dynvllm plugin package (see docs/plugins.md)."""
