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
        description="Responses kept for GET /v1/responses/{id}, DELETE, cancel and previous_response_id "
        "(store: true). Each frontend process keeps up to this many of those it made in memory (the least "
        "recently used go first); every frontend process of the namespace (--http-workers, other frontends) "
        "reads them from a NATS JetStream bucket that keeps the newest this many written, the oldest "
        "dropped first.",
    )
    responses_share: bool = Field(
        True,
        description="Share stored responses with every frontend process of the namespace through NATS "
        "JetStream. Off: each process knows only the responses it made (a GET, DELETE, cancel or "
        "previous_response_id that reaches another process or frontend gets a 404).",
    )
