"""Environment variables dynvllm sets for the child processes it starts (a leaf module: the
parents that set them and the children that read them import it, never each other)."""

from __future__ import annotations

#: The child's whole settings, as `Settings.to_json` wrote them.
SETTINGS_ENV = "DYN_INTERNAL_SETTINGS_JSON"
#: How many times `serve` restarted this child's slot after a crash (worker metrics show it).
RESTARTS_ENV = "DYNVLLM_RESTARTS"
