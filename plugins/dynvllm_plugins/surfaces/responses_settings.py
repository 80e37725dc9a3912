"""Settings of the Responses API surface (entry point `dynvllm.settings: responses`). Pure
pydantic: the CLI imports it for --help."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from dynvllm.settings import SettingsGroup


class ResponsesSettings(SettingsGroup):
    title: ClassVar[str] = "Responses API (/v1/responses)"
    responses_store_size: int = Field(
        1000,
        ge=1,
        description="Responses kept for GET /v1/responses/{id} and previous_response_id (store: true), "
        "in each frontend process's memory; the least recently used go first. With --http-workers N a "
        "response is known only to the process that created it.",
    )
