"""Our own /v1 routes: generate with our settings schema, health and Prometheus metrics."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from sdaccel.errors import ConfigError
from sdaccel.serve.checks import BadRequest, JobParams, body_of, check_counts, generation_for
from sdaccel.serve.server import Server, ServerDep

router = APIRouter(prefix="/v1")
PER_REQUEST = ("generation", "sampler", "seed")  # the settings a request may set


class NativeRequest(BaseModel):
    """POST /v1/generate: a prompt and our own settings schema for what may differ per request
    (generation, sampler, seed); the rest is fixed when the server starts."""

    model_config = {"extra": "forbid"}

    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    num_images: int = 1
    save: bool = False
    settings: dict[str, Any] = {}


@router.post("/generate")
async def generate(request: Request, server: ServerDep):
    body = await body_of(request, NativeRequest, server.limits)
    params, seed = native_params(body, server)
    results = await server.generate(body.prompt, seed, body.num_images, 1, params)
    if results is None:
        return JSONResponse({"detail": "interrupted", "images": []}, 200)
    return {"images": server.keep(results, params, body.save)}


@router.get("/health")
async def health(server: ServerDep):
    return {"status": "ok", "model": server.model_name, "queued_images": server.queued(),
            "device": str(server.engine.device)}


@router.get("/metrics")
async def prometheus(server: ServerDep):
    return PlainTextResponse(server.metrics.prometheus(server.queued()),
                             media_type="text/plain; version=0.0.4")


def native_params(body: NativeRequest, server: Server) -> tuple[JobParams, int]:
    """The engine parameters and first seed of a /v1/generate body: its settings layered over
    the server's, as --set values over a preset."""
    from sdaccel.settings import layer_over

    for key in body.settings:
        if key not in PER_REQUEST:
            raise BadRequest(f"settings.{key}", "fixed when the server starts; per request: "
                             f"{', '.join(PER_REQUEST)}")
    overrides = [f"{key}={json.dumps(value)}" for key, value in _dotted(body.settings)]
    try:
        chosen = layer_over(server.settings, overrides=overrides).settings
    except ConfigError as exc:
        raise BadRequest(f"settings.{exc.key}" if exc.key else "body", str(exc)) from None
    g = chosen.generation
    generation = generation_for(g.width, g.height, g.guidance_scale, server.engine,
                                server.limits)
    check_counts(body.num_images, 1, chosen.sampler.steps, server.limits)
    seed = body.seed if body.seed is not None else chosen.seed
    return JobParams(body.negative_prompt, generation, chosen.sampler), seed


def _dotted(values: dict[str, Any], prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
