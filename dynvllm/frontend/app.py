"""The frontend's HTTP application: the API surfaces' routes over one request path, the routes
every deployment shares (probes, metrics, admin calls), API keys and error pages."""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.routing import Router as StarletteRouter
from starlette.types import Receive, Scope, Send

from dynvllm.frontend import bodies
from dynvllm.frontend.admin import AdminCalls, OnDemandAdapters
from dynvllm.frontend.admission_load import Thresholds
from dynvllm.frontend.auth import ApiKeyMiddleware
from dynvllm.frontend.errors import RequestError
from dynvllm.frontend.gate import AdmissionGate
from dynvllm.frontend.media import MediaPolicy
from dynvllm.frontend.metrics import FrontendMetrics
from dynvllm.frontend.models import ModelRegistry
from dynvllm.frontend.request_path import RequestPath
from dynvllm.frontend.routing import Router
from dynvllm.frontend.surface import Surface, load_surfaces
from dynvllm.frontend.tenancy import Tenants
from dynvllm.runtime.streams import StreamClientPool
from dynvllm.settings import Settings


class _StaticFirst(StarletteRouter):
    """Starlette tries routes one by one, so a surface loaded late paid for every route before
    its own (/v1/responses was 24th of 27: 12.7 us against chat's 6.2). A path without
    parameters, as every inference route has, finds its routes by one lookup instead; the rest
    (parameters, a wrong method's 405, unknown paths) goes through Starlette's own matching."""

    def __init__(self, routes: list[BaseRoute]) -> None:
        super().__init__(routes)
        self._static: dict[str, list[Route]] = {}
        for route in routes:
            if isinstance(route, Route) and not route.param_convertors:
                self._static.setdefault(route.path, []).append(route)

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in self._static.get(scope["path"], ()):
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.setdefault("router", self)
                    scope["route"] = route
                    scope.update(child_scope)
                    await route.handle(scope, receive, send)
                    return
        await super().app(scope, receive, send)


class FrontendApp:
    def __init__(
        self,
        models: ModelRegistry,
        pool: StreamClientPool,
        router: Router,
        whole: Settings,
        admin_token: str | None = None,
        lora_on_demand: bool = False,
    ) -> None:
        settings = whole.frontend
        self.models, self.pool, self.router = models, pool, router
        self.max_body = settings.max_request_bytes
        self.admin = AdminCalls(models, pool, admin_token)
        on_demand = OnDemandAdapters(models, pool, router.inflight, admin_token) if lora_on_demand else None
        self.metrics = FrontendMetrics()
        self.metrics.watch_workers(
            lambda: [
                (e.name, inst.role)
                for e in list(self.models.models.values())
                for inst in list(e.instances.values())
            ]
        )
        models.watcher.on_add.append(self._registered)
        self.path = RequestPath(
            models, pool, router, self.metrics, MediaPolicy.from_settings(settings), on_demand
        )
        self.path.worker_wait = settings.admission_timeout
        self.path.max_worker_waits = settings.admission_queue_size
        self.surfaces: list[Surface] = load_surfaces(settings.api_surface_list(), self.path, whole)
        # Admission: the tenant's limits first (a refused request takes no place in the queue),
        # then the wait for a worker slot.
        self.tenants: Tenants | None = None
        if settings.tenants_file is not None:
            self.tenants = Tenants(settings.tenants_file, self.surfaces, self.metrics)
            self.path.on_admit.append(self.tenants.admit)
            self.path.on_end.append(self.tenants.end)
            self.path.may_use = self.tenants.may_use
        self.gate = AdmissionGate(
            models,
            self.metrics,
            settings.max_inflight_per_worker,
            settings.admission_queue_size,
            settings.admission_timeout,
            Thresholds(settings.admission_max_waiting, settings.admission_max_kv_use),
        )
        self.path.on_admit.append(self.gate.enter)
        self.path.on_end.append(self.gate.leave)
        watcher = models.watcher
        for callbacks in (watcher.on_add, watcher.on_update, watcher.on_remove):
            callbacks.append(self.gate.changed)
        self._draining = False
        # Routes every deployment shares answer errors and auth as the first surface does.
        self.default_surface = self.surfaces[0] if self.surfaces else Surface(self.path, whole)
        shared = [
            Route("/version", self.version, methods=["GET"]),
            Route("/v1/load_lora_adapter", self.load_lora, methods=["POST"]),
            Route("/clear_kv_blocks", self.clear_kv, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self.unload_lora, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/live", self.live, methods=["GET"]),
            Route("/metrics", self.prom, methods=["GET"]),
        ]
        self._owned: list[tuple[BaseRoute, Surface]] = [
            (route, s) for s in self.surfaces for route in s.routes()
        ]
        routes = shared + [route for route, _ in self._owned]
        self._owners: dict[str, Surface] = {}
        middleware = []
        keys = settings.api_keys()
        if keys or self.tenants is not None:
            also = self.tenants.accepts if self.tenants is not None else None
            middleware.append(Middleware(ApiKeyMiddleware, keys=keys, owner=self.owner, also=also))
        self.app = Starlette(
            routes=routes,
            middleware=middleware,
            exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        )
        self.app.router = _StaticFirst(routes)

    def _registered(self, inst: Any) -> None:
        if inst.component == "worker" and inst.card.get("model"):
            restarts = int(inst.card.get("restarts") or 0)
            self.metrics.worker_registered(inst.id, inst.card["model"], inst.role, restarts, inst.started)

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        """Draining: /health says so, and requests waiting for a worker or a slot get a 503."""
        self._draining = value
        if value:
            self.path.closing = True
            self.gate.close()

    def owner(self, scope: Any) -> Surface:
        """The surface whose route a request is for (the default one for shared routes)."""
        path = scope["path"]
        known = self._owners.get(path)
        if known is not None:
            return known
        found = self.default_surface
        for route, surface in self._owned:
            if route.matches(scope)[0] != Match.NONE:
                found = surface
                break
        # Remembered by path (matching every route costs more than the key check it serves),
        # for a bounded number of paths: clients may send any.
        if len(self._owners) < 256:
            self._owners[path] = found
        return found

    # ---- shared routes ------------------------------------------------------------------
    async def load_lora(self, request: Request) -> Response:
        """vLLM's dynamic LoRA route: load on every worker of the base model."""
        return await self.admin.lora(request, await self._body(request), load=True)

    async def unload_lora(self, request: Request) -> Response:
        return await self.admin.lora(request, await self._body(request), load=False)

    async def clear_kv(self, request: Request) -> Response:
        return await self.admin.clear_kv(request, self._forget_cache)

    def _forget_cache(self, worker_id: str) -> None:
        index = self.router.index
        if index is not None:
            index.drop_instance(worker_id)

    async def _body(self, request: Request) -> bytes:
        return await bodies.read(request, self.max_body)

    async def version(self, request: Request) -> Response:
        from importlib.metadata import version

        return JSONResponse({"version": version("dynvllm")})

    async def live(self, request: Request) -> Response:
        return JSONResponse({"status": "alive", "pid": os.getpid()})

    async def health(self, request: Request) -> Response:
        """200 when some model can serve requests end to end; counts workers per model and role."""
        entries = self.models.models.values()
        workers = sum(len(e.instances) for e in entries)
        ready = sorted(e.name for e in entries if e.servable)
        ok = bool(ready) and not self.draining
        roles: dict[str, dict[str, int]] = {}
        for e in entries:
            for inst in e.instances.values():
                per_model = roles.setdefault(e.name, {})
                per_model[inst.role] = per_model.get(inst.role, 0) + 1
        body = {
            "status": "healthy" if ok else "unhealthy",
            "workers": workers,
            "models": ready,
            "roles": roles,
            "draining": self.draining,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    async def prom(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown route, wrong method) as JSON errors, not as plain text."""
    assert isinstance(exc, HTTPException)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    body = RequestError(exc.status_code, message, kind)
    return JSONResponse(body.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug of ours still answers as a JSON error (the traceback goes to the log)."""
    err = RequestError(500, f"internal error: {type(exc).__name__}", "internal_server_error")
    return JSONResponse(err.body(), status_code=500)
