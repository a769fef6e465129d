"""An A1111 txt2img or img2img body -> the server's work (its engine parameters, seeds, init
images, the model it runs on) -> A1111's answer. The checks that need no model come first; the
model (loaded if the request names another) answers only the size check and the prompt's chunk
count."""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass
from typing import Any

from sdaccel.catalogue import SAMPLERS
from sdaccel.serve.a1111 import (
    A1111Request,
    Img2ImgRequest,
    Txt2ImgRequest,
    Unsupported,
    check_overrides,
    check_request,
    hires_for,
    info_text,
    inpaint_fields,
    sampler_for,
)
from sdaccel.serve.checks import (
    BadRequest,
    JobParams,
    Limits,
    check_counts,
    generation_for,
    hires_within,
)
from sdaccel.serve.pictures import Inpaint, Prepared, decode, prepare
from sdaccel.serve.server import Server
from sdaccel.settings import HiresSettings, SamplerSettings, adaptive_problem

CHECKPOINT_FIELD = "override_settings.sd_model_checkpoint"


@dataclass
class Work:
    """One request's work: what Server.generate takes, and what its answer reports."""

    prompt: str  # without its <lora:...> tags
    seed: int
    per_batch: int
    batches: int
    sampler: SamplerSettings
    ignored: list[str]
    model_field: str | None = None  # the checkpoint it names (None: the current one)
    loras: tuple | None = None
    hires: HiresSettings | None = None
    strength: float | None = None  # image to image's
    prepared: Prepared | None = None  # its init images
    params: JobParams | None = None
    chunks: int = 1

    @property
    def denoising_strength(self) -> float | None:
        return self.strength if self.hires is None else self.hires.denoising_strength


def _checked(body: A1111Request, server: Server) -> Work:
    """The checks that need no model: fields we cannot honour, sampler, counts, LoRA tags."""
    try:
        ignored = check_request(body)
        checkpoint, more = check_overrides(body.override_settings)
        sampler = sampler_for(body, server.settings.sampler)
        hires = hires_for(body) if isinstance(body, Txt2ImgRequest) else None
    except Unsupported as exc:
        raise BadRequest(exc.field, str(exc)) from None
    if problem := adaptive_problem(server.settings.adaptive, sampler):  # the server's own mode
        raise BadRequest("sampler_name", problem)
    check_counts(body.batch_size, body.n_iter, body.steps, server.limits)
    if hires is not None:
        hires_within(hires, body.width, body.height, server.limits)
    prompt, loras = server.prompt_loras(body.prompt, body.disable_extra_networks)
    seed = body.seed if body.seed >= 0 else secrets.randbelow(2**32)
    return Work(prompt, seed, body.batch_size, body.n_iter,
                sampler.model_copy(update={"steps": body.steps}), ignored + more, checkpoint,
                loras, hires)


async def _on_model(work: Work, body: A1111Request, server: Server) -> Work:
    """The checks the model answers (its size multiple, the prompt's chunk count): the
    request's checkpoint is loaded first if it is not (a 4xx naming it if it cannot be)."""
    model = server.model_for(work.model_field, CHECKPOINT_FIELD)
    engine = await server.engine_for(model, CHECKPOINT_FIELD)
    generation = generation_for(body.width, body.height, body.cfg_scale, engine, server.limits,
                                work.strength)
    work.chunks = engine.prompts.chunk_count(work.prompt, body.negative_prompt)
    hires = work.hires
    if hires is None and server.settings.hires.enabled:  # A1111's enable_hr false: off
        hires = server.settings.hires.model_copy(update={"enabled": False})
    start = None if work.prepared is None else (work.prepared.start.masks is not None,
                                                work.prepared.start.mask_blur)
    work.params = JobParams(body.negative_prompt, generation, work.sampler, model.title,
                            work.loras, hires, start)
    return work


async def txt2img_work(body: Txt2ImgRequest, server: Server) -> Work:
    return await _on_model(_checked(body, server), body, server)


async def img2img_work(body: Img2ImgRequest, server: Server) -> Work:
    """img2img: the init images (one for the whole batch, or one per image, batch_size then
    their count, as A1111), the mask and the inpaint fields."""
    count = len(body.init_images)
    if count == 0:
        raise BadRequest("init_images", "send at least one image (base64)")
    if count > 1 and count > body.batch_size:
        raise BadRequest("init_images", f"{count} images for batch_size {body.batch_size}: "
                         "send one, or at most batch_size (as A1111)")
    work = _checked(body, server)
    if count > 1:
        work.per_batch = count
        check_counts(count, body.n_iter, body.steps, server.limits)
    try:
        blur, fill = inpaint_fields(body)
    except Unsupported as exc:
        raise BadRequest(exc.field, str(exc)) from None
    work.strength = 0.75 if body.denoising_strength is None else body.denoising_strength
    work.prepared = await asyncio.to_thread(_pictures, body, server.limits, blur, fill)
    return await _on_model(work, body, server)


def _pictures(body: Img2ImgRequest, limits: Limits, blur: int, fill: int) -> Prepared:
    images = [decode(value, f"init_images.{k}", limits.max_image_pixels)
              for k, value in enumerate(body.init_images)]
    mask = decode(body.mask, "mask", limits.max_image_pixels) if body.mask else None
    inpaint = Inpaint(mask, blur, fill, body.inpaint_full_res, body.inpaint_full_res_padding,
                      bool(body.inpainting_mask_invert))
    return prepare(images, inpaint, body.width, body.height)


async def run(work: Work, server: Server) -> list[Any] | None:
    start = None if work.prepared is None else work.prepared.start.for_prompts(work.per_batch)
    return await server.generate(work.prompt, work.seed, work.per_batch, work.batches,
                                 work.params, work.chunks, start)


def answer(body: A1111Request, work: Work, results: list[Any] | None,
           server: Server) -> dict[str, Any]:
    """A1111's response: base64 PNGs, the request's parameters and the `info` JSON string."""
    parameters = body.model_dump()
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        parameters.update(init_images=None, mask=None)  # as A1111: not sent back
    if results is None:
        return {"images": [], "parameters": parameters, "info": json.dumps(
            {"interrupted": True, "sdaccel_ignored": work.ignored})}
    finish = work.prepared.finish if work.prepared and work.prepared.pastes else None
    saved = server.keep(results, work.params, body.save_images and not body.do_not_save_samples,
                        finish)
    model = server.model(work.params.model)  # the model they were made on
    info = info_text(body, SAMPLERS[work.sampler.name].a1111, [r.seed for r in results],
                     model.model_name, model.hash, [s["parameters"] for s in saved],
                     work.ignored, work.denoising_strength)
    return {"images": [s["png_base64"] for s in saved] if body.send_images else [],
            "parameters": parameters, "info": json.dumps(info)}
