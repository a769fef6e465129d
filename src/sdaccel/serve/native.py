"""Our own /v1 routes: generate with our settings schema, health and Prometheus metrics."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel

from sdaccel.errors import ConfigError
from sdaccel.serve.checks import (
    BadRequest,
    JobParams,
    body_of,
    check_counts,
    generation_for,
    hires_within,
)
from sdaccel.serve.server import Server, ServerDep

router = APIRouter(prefix="/v1")
PER_REQUEST = ("generation", "sampler", "seed", "hires")  # the settings a request may set


class NativeRequest(BaseModel):
    """POST /v1/generate: a prompt and our own settings schema for what may differ per request
    (generation, sampler, seed, hires); the rest is fixed when the server starts."""

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
    prompt, params, seed, chunks = await native_params(body, server)
    results = await server.generate(prompt, seed, body.num_images, 1, params, chunks)
    if results is None:
        return JSONResponse({"detail": "interrupted", "images": []}, 200)
    return {"images": server.keep(results, params, body.save)}


@router.get("/health")
async def health(server: ServerDep):
    engine = server.engine  # None while a switch loads the next one
    return {"status": "ok", "model": server.model_name, "queued_images": server.queued(),
            "device": str(engine.device) if engine is not None else None}


@router.get("/metrics")
async def prometheus(server: ServerDep):
    return PlainTextResponse(server.metrics.prometheus(server.queued()),
                             media_type="text/plain; version=0.0.4")


async def native_params(body: NativeRequest, server: Server
                        ) -> tuple[str, JobParams, int, int]:
    """The prompt (without its <lora:...> tags), engine parameters, first seed and the prompt's
    chunk count of a /v1/generate body: its settings layered over the server's, as --set values
    over a preset. It runs on the current model."""
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
    check_counts(body.num_images, 1, chosen.sampler.steps, server.limits)
    hires = chosen.hires if "hires" in body.settings or chosen.hires.enabled else None
    if hires is not None and hires.enabled:
        hires_within(hires, g.width, g.height, server.limits)
    prompt, loras = server.prompt_loras(body.prompt)
    model = server.current
    engine = await server.engine_for(model)
    generation = generation_for(g.width, g.height, g.guidance_scale, engine, server.limits)
    chunks = engine.prompts.chunk_count(prompt, body.negative_prompt)
    seed = body.seed if body.seed is not None else chosen.seed
    return prompt, JobParams(body.negative_prompt, generation, chosen.sampler, model.title,
                             loras, hires), seed, chunks


def _dotted(values: dict[str, Any], prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
