"""AUTOMATIC1111's /sdapi/v1 routes that draw or steer: txt2img and img2img (serve/work.py turns
their bodies into our settings), options (a model switch), progress, interrupt and skip. The
lists its clients read are in listings.py."""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Request

from sdaccel.serve import work
from sdaccel.serve.a1111 import Img2ImgRequest, Txt2ImgRequest
from sdaccel.serve.checks import BadRequest, body_of, read_body
from sdaccel.serve.server import Server, ServerDep

router = APIRouter(prefix="/sdapi/v1")
log = logging.getLogger("sdaccel.serve")
# POST options keys that do something; the rest of a round-tripped dict is ignored.
HONOURED_OPTIONS = ("sd_model_checkpoint",)


@router.post("/txt2img")
async def txt2img(request: Request, server: ServerDep):
    body = await body_of(request, Txt2ImgRequest, server.limits)
    job = await work.txt2img_work(body, server)
    return work.answer(body, job, await work.run(job, server), server)


@router.post("/img2img")
async def img2img(request: Request, server: ServerDep):
    body = await body_of(request, Img2ImgRequest, server.limits)
    job = await work.img2img_work(body, server)
    return work.answer(body, job, await work.run(job, server), server)


@router.get("/options")
async def get_options(server: ServerDep):
    return options_of(server)


def options_of(server: Server) -> dict:
    """The options A1111's clients read (and send back whole)."""
    model = server.current
    return {"sd_model_checkpoint": model.title, "sd_checkpoint_hash": model.sha256,
            "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0,
            "samples_format": "png", "sd_checkpoints_limit": 1,
            "show_progress_every_n_steps": 1, "live_previews_enable": True,
            "img2img_background_color": "#ffffff", "upscaler_for_img2img": None,
            "sd_lora": "None", "sd_hypernetwork": "None"}


@router.post("/options")
async def set_options(request: Request, server: ServerDep):
    raw = await read_body(request, server.limits.max_body_bytes)
    try:
        options = json.loads(raw or b"{}")
    except json.JSONDecodeError as exc:
        raise BadRequest("body", f"not JSON ({exc.msg})") from None
    if not isinstance(options, dict):
        raise BadRequest("body", "expected a JSON object of options")
    current = options_of(server)
    for key, value in options.items():
        if key not in HONOURED_OPTIONS and value != current.get(key, value):
            log.debug("options: %s=%r ignored", key, value)
    if options.get("sd_model_checkpoint") not in (None, ""):
        await server.switch(options["sd_model_checkpoint"])
    return None


@router.get("/progress")
async def progress(server: ServerDep, skip_current_image: bool = False):
    p = server.batcher.progress
    loading = server.loading
    state = {"job_count": p.queued_images + p.batch_images, "sampling_step": p.step,
             "sampling_steps": p.steps, "interrupted": p.interrupted, "skipped": p.skipped,
             "job": f"Loading {loading}" if loading else "", "job_no": 0,
             "job_timestamp": "0"}
    if not skip_current_image:
        server.want_preview()  # the next step is decoded
    return {"progress": round(p.fraction(), 4), "eta_relative": round(p.eta(), 3),
            "state": state, "current_image": None if skip_current_image else server.preview,
            "textinfo": state["job"] or None}


@router.post("/interrupt")
async def interrupt(server: ServerDep):
    server.batcher.interrupt()
    return None


@router.post("/skip")
async def skip(server: ServerDep):
    server.batcher.skip()
    return None
