"""The HTTP front end: AUTOMATIC1111's API subset, our own endpoints, metrics and a gallery.

FastAPI (on Starlette, served by uvicorn): AUTOMATIC1111 itself is a FastAPI app, so its clients
already parse FastAPI's 422 bodies, and the request models are pydantic, like our settings.

The app is its routers (sdapi.py: A1111's /sdapi/v1; native.py: /v1; gallery.py: / and the
images) over one Server (server.py) kept in `app.state.server`: the engine, built once by the
lifespan handler (or before, by `app.state.server.start()`), the batcher, metrics and recent
images. A route is added to the router of its API, and reads the state through `ServerDep`.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sdaccel import runs
from sdaccel.serve import gallery, native, sdapi
from sdaccel.serve.batcher import QueueFull
from sdaccel.serve.checks import BadRequest, Limits
from sdaccel.serve.server import EngineStart, Server
from sdaccel.settings import Settings

__all__ = ["Limits", "Server", "create_app"]

# Paths that need the API key (when the server has one) and that the request metrics count.
API_PATHS = ("/sdapi", "/v1/generate")


def create_app(settings: Settings, limits: Limits | None = None, api_key: str | None = None,
               on_notice: Callable[[str], None] = lambda message: None,
               start_engine: EngineStart = runs.start_engine) -> FastAPI:
    """The app serving `settings`' model. Its engine is built by `start_engine(settings,
    on_event)` (default: warm from the compile cache; its warnings go to `on_notice`) when the
    app starts, unless `app.state.server.start()` built it before."""
    app = FastAPI(title="sdaccel", docs_url="/docs", redoc_url=None, lifespan=_lifespan)
    app.state.server = Server(settings, limits, api_key, start_engine, on_notice)
    app.middleware("http")(_guard)
    app.add_exception_handler(BadRequest, _bad_request)
    app.add_exception_handler(QueueFull, _queue_full)
    for module in (sdapi, native, gallery):
        app.include_router(module.router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    server: Server = app.state.server
    server.start()  # the model loads once, before the first request
    try:
        yield
    finally:
        server.close()


async def _guard(request: Request, call_next) -> Response:
    """The API key on the API paths, the body size limit, and the request metrics."""
    server: Server = request.app.state.server
    path = request.url.path
    if server.api_key and path.startswith(API_PATHS) and not _authorised(request,
                                                                         server.api_key):
        response: Response = JSONResponse(
            {"detail": "missing or wrong API key (Authorization: Bearer KEY, or basic auth with "
             "the key as password)"}, 401, {"WWW-Authenticate": "Bearer"})
    elif (length := request.headers.get("content-length")) and length.isdigit() and int(
            length) > server.limits.max_body_bytes:
        response = JSONResponse(
            {"detail": f"body: {length} bytes, limit {server.limits.max_body_bytes}"}, 413)
    else:
        response = await call_next(request)
    if path.startswith(API_PATHS):
        server.metrics.request(path, response.status_code)
    return response


async def _bad_request(_request: Request, exc: BadRequest) -> JSONResponse:
    return JSONResponse({"detail": str(exc), "field": exc.field}, 422)


async def _queue_full(_request: Request, exc: QueueFull) -> JSONResponse:
    return JSONResponse({"detail": f"busy: {exc}"}, 503, {"Retry-After": "2"})


def _authorised(request: Request, api_key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return secrets.compare_digest(value.strip(), api_key)
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except ValueError:
            return False
        return secrets.compare_digest(password, api_key)
    return False
