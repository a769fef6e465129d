"""AUTOMATIC1111's /sdapi/v1 routes: txt2img (serve/a1111.py turns its body into our settings),
the lists its clients read (samplers, schedulers, models, options), progress and interrupt."""

from __future__ import annotations

import json
import secrets

from fastapi import APIRouter, Request

from sdaccel.catalogue import SAMPLER_TABLE, SAMPLERS, SCHEDULE_LABELS
from sdaccel.serve.a1111 import Txt2ImgRequest, Unsupported, check_request, info_text, sampler_for
from sdaccel.serve.checks import BadRequest, JobParams, body_of, check_counts, generation_for
from sdaccel.serve.server import Server, ServerDep
from sdaccel.settings import adaptive_problem

router = APIRouter(prefix="/sdapi/v1")


@router.post("/txt2img")
async def txt2img(request: Request, server: ServerDep):
    body = await body_of(request, Txt2ImgRequest, server.limits)
    params, ignored = _params(body, server)
    seed = body.seed if body.seed >= 0 else secrets.randbelow(2**32)
    results = await server.generate(body.prompt, seed, body.batch_size, body.n_iter, params)
    if results is None:
        return {"images": [], "parameters": body.model_dump(), "info": json.dumps(
            {"interrupted": True, "sdaccel_ignored": ignored})}
    saved = server.keep(results, params, body.save_images and not body.do_not_save_samples)
    label = SAMPLERS[params.sampler.name].a1111
    info = info_text(body, label, [r.seed for r in results], server.model_name,
                     server.model_hash, [s["parameters"] for s in saved], ignored)
    return {"images": [s["png_base64"] for s in saved] if body.send_images else [],
            "parameters": body.model_dump(), "info": json.dumps(info)}


def _params(body: Txt2ImgRequest, server: Server) -> tuple[JobParams, list[str]]:
    """The engine parameters of a txt2img body, and the fields accepted but ignored."""
    try:
        ignored = check_request(body, server.model_name)
        sampler = sampler_for(body, server.settings.sampler)
    except Unsupported as exc:
        raise BadRequest(exc.field, str(exc)) from None
    if problem := adaptive_problem(server.settings.adaptive, sampler):  # the server's own mode
        raise BadRequest("sampler_name", problem)
    generation = generation_for(body.width, body.height, body.cfg_scale, server.engine,
                                server.limits)
    check_counts(body.batch_size, body.n_iter, body.steps, server.limits)
    sampler = sampler.model_copy(update={"steps": body.steps})  # checked above
    return JobParams(body.negative_prompt, generation, sampler), ignored


@router.get("/samplers")
async def samplers():
    return [{"name": s.a1111, "aliases": [s.name], "options": {}} for s in SAMPLER_TABLE]


@router.get("/schedulers")
async def schedulers():  # A1111 1.9+'s schedule types, those sampler.schedule has
    return [{"name": label.lower().replace(" ", "_"), "label": label, "aliases": None,
             "default_rho": -1, "need_inner_model": False}
            for label in SCHEDULE_LABELS.values()]


@router.get("/sd-models")
async def sd_models(server: ServerDep):
    name = server.model_name
    return [{"title": name, "model_name": name, "hash": server.model_hash, "sha256": None,
             "filename": name, "config": None}]


@router.get("/options")
async def get_options(server: ServerDep):
    return {"sd_model_checkpoint": server.model_name, "samples_format": "png",
            "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0}


@router.post("/options")
async def set_options(request: Request, server: ServerDep):
    try:
        options = json.loads(await request.body() or b"{}")
    except json.JSONDecodeError as exc:
        raise BadRequest("body", f"not JSON ({exc.msg})") from None
    if not isinstance(options, dict):
        raise BadRequest("body", "expected a JSON object of options")
    wanted = options.get("sd_model_checkpoint")
    if wanted not in (None, server.model_name):
        raise BadRequest("sd_model_checkpoint", f"{wanted!r} is not served here; valid: "
                         f"{server.model_name!r} (start the server with --model to serve "
                         "another)")
    return None


@router.get("/progress")
async def progress(server: ServerDep):
    p = server.batcher.progress
    state = {"job_count": p.queued_images + p.batch_images, "sampling_step": p.step,
             "sampling_steps": p.steps, "interrupted": False, "job": "", "skipped": False}
    return {"progress": round(p.fraction(), 4), "eta_relative": round(p.eta(), 3),
            "state": state, "current_image": None, "textinfo": None}


@router.post("/interrupt")
async def interrupt(server: ServerDep):
    server.batcher.interrupt()
    return None
