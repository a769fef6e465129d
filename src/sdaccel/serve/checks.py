"""What a request may ask (Limits) and the checks the routes share: every refusal is a
BadRequest, a 422 naming the request field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

from sdaccel.errors import ConfigError
from sdaccel.settings import GenerationSettings, SamplerSettings

if TYPE_CHECKING:
    from fastapi import Request


@dataclass(frozen=True)
class Limits:
    max_batch: int = 4  # images per engine call
    # How long a batch waits for compatible requests. 4 clients on the bundled model: 1.41x
    # the images/s of no batching at 30 ms, 1.88x at 100 ms (replies leave one by one, so
    # the clients' next requests arrive spread out; examples/serve_load.py).
    max_wait_ms: int = 100
    max_queue: int = 64  # images waiting; beyond: 503
    max_pixels: int = 1024 * 1024  # width x height of one image
    max_images: int = 16  # batch_size x n_iter of one request
    max_steps: int = 150
    max_body_bytes: int = 1 << 20


class BadRequest(ValueError):
    """A 422 naming the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


# Settings keys -> the A1111 request fields that set them.
A1111_FIELDS = {"generation.width": "width", "generation.height": "height",
                "generation.guidance_scale": "cfg_scale", "sampler.steps": "steps",
                "sampler.schedule": "scheduler", "sampler.eta": "eta",
                "adaptive.mode": "sampler_name", "sampler.name": "sampler_name"}


def refused(exc: ConfigError) -> BadRequest:
    """A ConfigError about the request (a size the model cannot take), as the A1111 field that
    sets its key ("body" when no field does)."""
    return BadRequest(A1111_FIELDS.get(exc.key or "", "body"), str(exc))


async def body_of(request: Request, model: type[BaseModel], limits: Limits):
    """The request body as `model`; a body over the limit or not matching it is refused."""
    raw = await request.body()
    if len(raw) > limits.max_body_bytes:
        raise BadRequest("body", f"{len(raw)} bytes, limit {limits.max_body_bytes}")
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "body"
        raise BadRequest(where, error["msg"]) from None


def generation_for(width: int, height: int, guidance: float, engine,
                   limits: Limits) -> GenerationSettings:
    """A request's size and guidance, within the limits and a size the model takes."""
    if width * height > limits.max_pixels:
        raise BadRequest("width", f"{width}x{height} is beyond the server's --max-pixels "
                         f"{limits.max_pixels}")
    try:
        generation = GenerationSettings(width=width, height=height, guidance_scale=guidance)
        engine.check_size(height, width)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise BadRequest(str(error["loc"][0]) if error["loc"] else "body",
                         error["msg"]) from None
    except ConfigError as exc:
        raise refused(exc) from None
    return generation


def check_counts(batch_size: int, n_iter: int, steps: int, limits: Limits) -> None:
    for field_name, value in (("batch_size", batch_size), ("n_iter", n_iter), ("steps", steps)):
        if value < 1:
            raise BadRequest(field_name, f"{value}: must be at least 1")
    if batch_size * n_iter > limits.max_images:
        raise BadRequest("batch_size", f"{batch_size} x n_iter {n_iter} images: limit "
                         f"{limits.max_images} per request")
    if steps > limits.max_steps:
        raise BadRequest("steps", f"{steps}: limit {limits.max_steps}")


@dataclass(frozen=True)
class JobParams:
    """What a batch shares: every job with these parameters can ride in one engine call."""

    negative_prompt: str
    generation: GenerationSettings
    sampler: SamplerSettings

    def key(self) -> tuple:
        """What jobs must share to ride in one engine call (besides their prompts' chunk
        count)."""
        g = self.generation
        return (g.width, g.height, g.guidance_scale, *self.sampler.model_dump().values(),
                self.negative_prompt)
