"""Bearer API keys (`--api-key`): every route but the probes needs one; keys compare in constant time."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

from dynvllm.frontend.openai_api import APIError

#: Routes that stay open: probes and metrics scrapers carry no key.
OPEN_PATHS = frozenset({"/health", "/live", "/metrics", "/version"})


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str], open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.open_paths = open_paths

    def _allowed(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        # Compare against every key so the time taken does not reveal which one matched.
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(token.strip(), key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        if self._allowed(header):
            await self.app(scope, receive, send)
            return
        error = APIError(
            401, "Incorrect or missing API key: send Authorization: Bearer <key>", code="invalid_api_key"
        )
        body = json.dumps(error.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
            }
        )
        await send({"type": "http.response.body", "body": body})
