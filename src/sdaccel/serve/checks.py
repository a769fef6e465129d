"""What a request may ask (Limits) and the checks the routes share: every refusal is a
BadRequest, a 4xx naming the request field (422; 413 for a body over the limit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from sdaccel.errors import ConfigError
from sdaccel.settings import GenerationSettings, HiresSettings, SamplerSettings

if TYPE_CHECKING:
    from fastapi import Request

MIB = 1 << 20


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
    max_body_bytes: int = 50 * MIB  # serve --max-body-mb: init images come base64 in the body
    max_image_pixels: int = 4096 * 4096  # an init image or mask as sent, before any resizing


class BadRequest(ValueError):
    """A 4xx naming the field: 422 unless `status` says otherwise."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status


def too_large(size: int | str, limit: int) -> BadRequest:
    """The 413 of a body over --max-body-mb."""
    mb = f"{limit / MIB:g}"
    return BadRequest("body", f"{size} bytes is over the server's limit of {limit} bytes "
                      f"(--max-body-mb {mb})", 413)


# Settings keys -> the A1111 request fields that set them.
A1111_FIELDS = {"generation.width": "width", "generation.height": "height",
                "generation.guidance_scale": "cfg_scale", "sampler.steps": "steps",
                "sampler.schedule": "scheduler", "sampler.eta": "eta",
                "adaptive.mode": "sampler_name", "sampler.name": "sampler_name",
                "generation.strength": "denoising_strength", "hires.scale": "hr_scale",
                "hires.steps": "hr_second_pass_steps", "hires.upscaler": "hr_upscaler",
                "hires.denoising_strength": "denoising_strength", "hires.enabled": "enable_hr"}


def refused(exc: ConfigError) -> BadRequest:
    """A ConfigError about the request (a size the model cannot take), as the A1111 field that
    sets its key ("body" when no field does)."""
    return BadRequest(A1111_FIELDS.get(exc.key or "", "body"), str(exc))


async def read_body(request: Request, limit: int) -> bytes:
    """The body, read no further than `limit` bytes (a 413 past it, whatever the headers
    said)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"more than {limit}", limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def body_of(request: Request, model: type[BaseModel], limits: Limits):
    """The request body as `model`; a body over the limit or not matching it is refused."""
    raw = await read_body(request, limits.max_body_bytes)
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        raise invalid(exc) from None


def invalid(exc: ValidationError, fields: dict[str, str] | None = None) -> BadRequest:
    """A pydantic error as a BadRequest naming the field where it was found (renamed through
    `fields`)."""
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"]) or "body"
    return BadRequest((fields or {}).get(where, where), error["msg"])


# GenerationSettings / HiresSettings fields -> the A1111 request fields that set them
_GENERATION_FIELDS = {"guidance_scale": "cfg_scale", "strength": "denoising_strength"}
HIRES_FIELDS = {"scale": "hr_scale", "steps": "hr_second_pass_steps",
                "upscaler": "hr_upscaler", "denoising_strength": "denoising_strength"}


def generation_for(width: int, height: int, guidance: float, engine, limits: Limits,
                   strength: float | None = None) -> GenerationSettings:
    """A request's size, guidance and strength, within the limits and a size the model
    takes."""
    if width * height > limits.max_pixels:
        raise BadRequest("width", f"{width}x{height} is beyond the server's --max-pixels "
                         f"{limits.max_pixels}")
    extra: dict[str, Any] = {} if strength is None else {"strength": strength}
    try:
        generation = GenerationSettings(width=width, height=height, guidance_scale=guidance,
                                        **extra)
        engine.check_size(height, width)
    except ValidationError as exc:
        raise invalid(exc, _GENERATION_FIELDS) from None
    except ConfigError as exc:
        raise refused(exc) from None
    return generation


def hires_within(hires: HiresSettings, width: int, height: int, limits: Limits) -> None:
    """The hires pass's size and steps within the limits."""
    w, h = round(width * hires.scale), round(height * hires.scale)
    if w * h > limits.max_pixels:
        raise BadRequest("hr_scale", f"{hires.scale:g} x {width}x{height} = {w}x{h} is beyond "
                         f"the server's --max-pixels {limits.max_pixels}")
    if hires.steps > limits.max_steps:
        raise BadRequest("hr_second_pass_steps", f"{hires.steps}: limit {limits.max_steps}")


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
    model: str = ""  # the title of the model it runs on (serve/models.py)
    loras: tuple | None = None  # settings.LoraEntry in place of the settings' own, or None
    hires: HiresSettings | None = None  # the hires fix for this call, or the settings' own
    start: tuple | None = None  # (masked, mask_blur) when it starts from init images

    def key(self) -> tuple:
        """What jobs must share to ride in one engine call (besides their prompts' chunk
        count)."""
        g = self.generation
        loras = None if self.loras is None else tuple(
            (str(e.path), e.weight, e.sha256) for e in self.loras)
        hires = None if self.hires is None else tuple(self.hires.model_dump().values())
        return (self.model, g.width, g.height, g.guidance_scale, g.strength,
                *self.sampler.model_dump().values(), self.negative_prompt, loras, hires,
                self.start)
