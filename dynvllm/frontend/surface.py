"""What an API surface plugin provides (entry-point group `dynvllm.api_surfaces`).

A surface owns an API's routes, request models, response bodies, stream framing, error shape and
auth scheme; every surface runs its requests through the one `RequestPath` (admission, stages,
dispatch, post-processing, accounting). Adding an API is one module registered like any plugin:

    [project.entry-points."dynvllm.api_surfaces"]
    anthropic = "my_pkg.anthropic:AnthropicSurface"
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from dynvllm.frontend.errors import RequestError

if TYPE_CHECKING:
    from dynvllm.frontend.request_path import RequestPath
    from dynvllm.settings import Settings


class Surface:
    """Base class: an API served over the shared request path."""

    #: Shown in `dynvllm plugins` and in logs.
    description: str = ""

    def __init__(self, path: RequestPath, settings: Settings) -> None:
        """`settings`: the frontend's whole settings (a surface's own group: `settings.plugin(NAME)`)."""
        self.path, self.settings = path, settings
        self.frontend = settings.frontend
        self.max_body = settings.frontend.max_request_bytes

    def routes(self) -> list[BaseRoute]:
        """The HTTP routes this surface serves."""
        raise NotImplementedError

    async def start(self, nc: Any, namespace: str) -> None:
        """Called once the frontend process has its NATS connection (`nc`, namespace), before it
        serves: state the surface shares with the namespace's other frontend processes. Not called
        for an app built without NATS."""

    async def stop(self) -> None:
        """Called when the frontend process stops serving, before its NATS connection closes."""

    def error_response(self, err: RequestError, headers: dict[str, str] | None = None) -> Response:
        """An error in this API's shape (default: OpenAI's, as vLLM's server answers)."""
        return JSONResponse(err.body(), status_code=err.status, headers={**err.headers, **(headers or {})})

    # ---- auth ----------------------------------------------------------------------------
    def presented_key(self, headers: dict[bytes, bytes]) -> bytes | None:
        """The API key a request presents, in this API's scheme (default `Authorization: Bearer`)."""
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return token.strip() if scheme.lower() == b"bearer" else None

    def unauthorized(self) -> Response:
        err = RequestError(
            401, "Incorrect or missing API key: send Authorization: Bearer <key>", code="invalid_api_key"
        )
        return self.error_response(err, {"www-authenticate": "Bearer"})


def key_matches(given: bytes | None, keys: list[bytes]) -> bool:
    """Compare against every key so the time taken does not reveal which one matched."""
    if given is None:
        return False
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key)
    return ok


def load_surfaces(names: list[str] | None, path: RequestPath, settings: Settings) -> list[Any]:
    """The chosen surfaces (every installed one when `names` is None), constructed."""
    from dynvllm import registry

    chosen = names if names is not None else registry.names(registry.API_SURFACES)
    return [registry.load(registry.API_SURFACES, name)(path, settings) for name in chosen]
