"""API keys (`--api-key`, and tenants' keys from `--tenants-file`): every route but the probes
needs one; each API surface reads the key in its own scheme (Bearer for OpenAI, `x-api-key` for
Anthropic's) and refuses in its own shape."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from dynvllm.frontend.surface import Surface, key_matches

#: Routes that stay open: probes and metrics scrapers carry no key.
OPEN_PATHS = frozenset({"/health", "/live", "/metrics", "/version"})


class ApiKeyMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        keys: list[str],
        owner: Callable[[Scope], Surface],
        open_paths: frozenset[str] = OPEN_PATHS,
        also: Callable[[bytes | None], bool] | None = None,
    ) -> None:
        """`owner` names the surface a request belongs to (a default one for shared routes);
        `also` accepts more keys (tenants', which change while the server runs)."""
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.owner = owner
        self.open_paths = open_paths
        self.also = also

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        surface = self.owner(scope)
        key = surface.presented_key(dict(scope["headers"]))
        if key_matches(key, self.keys) or (self.also is not None and self.also(key)):
            await self.app(scope, receive, send)
            return
        await surface.unauthorized()(scope, receive, send)
