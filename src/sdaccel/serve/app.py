"""The HTTP front end: AUTOMATIC1111's API subset, our own endpoints, metrics and a gallery.

FastAPI (on Starlette, served by uvicorn): AUTOMATIC1111 itself is a FastAPI app, so its clients
already parse FastAPI's 422 bodies, and the request models are pydantic, like our settings.

The app is its routers (sdapi.py and listings.py: A1111's /sdapi/v1; native.py: /v1; gallery.py:
/ and the images) over one Server (server.py) kept in `app.state.server`: the engine, built once
by the lifespan handler (or before, by `app.state.server.start()`), the batcher, metrics and
recent images. A route is added to the router of its API, and reads the state through
`ServerDep`. With an API key, every route that shows a prompt, an image, a preview or a file
name needs it (the gallery takes it once, into an HttpOnly cookie); /v1/health and /v1/metrics
stay open.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sdaccel import runs
from sdaccel.serve import gallery, listings, native, sdapi
from sdaccel.serve.batcher import QueueFull
from sdaccel.serve.checks import BadRequest, Limits, too_large
from sdaccel.serve.gallery import authorised
from sdaccel.serve.server import EngineStart, Server
from sdaccel.settings import Settings

if TYPE_CHECKING:
    from sdaccel.serve.models_dir import ModelsDir

__all__ = ["Limits", "Server", "create_app"]

# Where the routes the request metrics count are.
API_PATHS = ("/sdapi", "/v1/generate")
# Paths open without the API key: nothing in them shows a prompt, an image or a file name.
OPEN_PATHS = {"/v1/health", "/v1/metrics", "/login", "/docs", "/docs/oauth2-redirect",
              "/openapi.json"}


def create_app(settings: Settings, limits: Limits | None = None, api_key: str | None = None,
               on_notice: Callable[[str], None] = lambda message: None,
               start_engine: EngineStart = runs.start_engine,
               models_dir: ModelsDir | None = None) -> FastAPI:
    """The app serving `settings`' model (and, with `models_dir`, the folder's checkpoints,
    LoRAs and embeddings). Its engine is built by `start_engine(settings, on_event)` (default:
    warm from the compile cache; its warnings go to `on_notice`) when the app starts, unless
    `app.state.server.start()` built it before."""
    app = FastAPI(title="sdaccel", docs_url="/docs", redoc_url=None, lifespan=_lifespan)
    app.state.server = Server(settings, limits, api_key, start_engine, on_notice, models_dir)
    app.middleware("http")(_guard)
    app.add_middleware(_NoTrailingSlash)  # added last: outermost, before the guard
    app.add_exception_handler(BadRequest, _bad_request)
    app.add_exception_handler(QueueFull, _queue_full)
    for module in (sdapi, listings, native, gallery):
        app.include_router(module.router)
    # The paths the metrics count: the API's routes (not whatever else a client asks for).
    paths = (getattr(route, "path", "") for module in (sdapi, listings, native)
             for route in module.router.routes)
    app.state.metric_paths = {path for path in paths if path.startswith(API_PATHS)}
    return app


class _NoTrailingSlash:
    """`/sdapi/v1/options/` is `/sdapi/v1/options` (openOutpaint sends the slash): every route
    answers with or without one, no redirect (a redirected POST loses its body in some
    clients)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            trimmed = path.rstrip("/") or "/"
            scope = {**scope, "path": trimmed, "raw_path": trimmed.encode()}
        await self.app(scope, receive, send)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    server: Server = app.state.server
    server.start()  # the model loads once, before the first request
    try:
        yield
    finally:
        server.close()


async def _guard(request: Request, call_next) -> Response:
    """The API key on every path but the open ones, the body size limit, and the request
    metrics."""
    server: Server = request.app.state.server
    path = request.url.path
    if server.api_key and path not in OPEN_PATHS and not authorised(request, server.api_key):
        response: Response = gallery.login(request, server.api_key) if path == "/" else \
            JSONResponse({"detail": "missing or wrong API key (Authorization: Bearer KEY, or "
                          "basic auth with the key as password)"}, 401,
                         {"WWW-Authenticate": "Bearer"})
    elif (length := request.headers.get("content-length")) and length.isdigit() and int(
            length) > server.limits.max_body_bytes:
        exc = too_large(length, server.limits.max_body_bytes)
        response = JSONResponse({"detail": str(exc), "field": exc.field}, exc.status)
    else:
        response = await call_next(request)
    if path in request.app.state.metric_paths:
        server.metrics.request(path, response.status_code)
    return response


async def _bad_request(_request: Request, exc: BadRequest) -> JSONResponse:
    return JSONResponse({"detail": str(exc), "field": exc.field}, exc.status)


async def _queue_full(_request: Request, exc: QueueFull) -> JSONResponse:
    return JSONResponse({"detail": f"busy: {exc}"}, 503, {"Retry-After": "2"})
