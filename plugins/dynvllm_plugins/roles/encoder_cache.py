"""The encoder-cache hand-over between encode workers and language workers: its settings
(entry point `dynvllm.settings: encode`) and the vLLM configuration each side gets.

vLLM's encoder-cache connector works over a shared folder: producers (encode workers) store
image embeddings by content hash, consumers (the language roles) load them instead of running
the vision encoder, and run it themselves when an embedding is not there. vLLM is imported only
when an engine is configured: the CLI imports this module for --help.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from dynvllm.registry import PluginError
from dynvllm.settings import Settings, SettingsGroup


class EncoderCacheSettings(SettingsGroup):
    title: ClassVar[str] = "Encode role (multimodal)"
    encoder_cache_dir: str | None = Field(
        None,
        description="Folder where encode workers leave image embeddings for language workers "
        "(shared by both; `serve` picks one when it starts an encode role).",
    )
    encoder_cache_entries: int = Field(
        4096, gt=0, description="Image embeddings an encode worker keeps before dropping the oldest."
    )


def engine_overrides(settings: Settings, ec_role: str = "ec_consumer") -> dict[str, Any]:
    """AsyncEngineArgs for one side of the hand-over; none when no folder is shared."""
    try:
        folder = settings.plugin(EncoderCacheSettings).encoder_cache_dir
    except PluginError:  # the encode plugin is hidden (DYN_LOAD_PLUGINS): no encode workers either
        return {}
    if not folder:
        return {}
    from vllm.config import ECTransferConfig

    return {
        "ec_transfer_config": ECTransferConfig(
            ec_connector="ECExampleConnector",
            ec_role=ec_role,
            ec_connector_extra_config={"shared_storage_path": folder},
        )
    }
