"""AUTOMATIC1111's /sdapi/v1 lists, in its shapes: what sdaccel has (samplers, schedule types,
checkpoints, the hires fix's upscalers, a models folder's LoRAs and embeddings) and empty lists
where it has none (VAEs, face restorers, scripts), so that clients that read them all at start
go on; png-info reads the A1111 parameters of an image."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from sdaccel.catalogue import SAMPLER_TABLE, SCHEDULE_LABELS
from sdaccel.serve.a1111 import HIRES_UPSCALER_NAMES, parse_infotext
from sdaccel.serve.checks import body_of
from sdaccel.serve.models import embeddings_listing, every_model
from sdaccel.serve.models_dir import CHECKPOINT_FOLDERS, EMBEDDING_FOLDERS, LORA_FOLDERS
from sdaccel.serve.pictures import decode
from sdaccel.serve.server import ServerDep

router = APIRouter(prefix="/sdapi/v1")
PIXEL_UPSCALERS = ("Lanczos",)  # hr_upscaler names that resize pixels; the rest are latent
# PNG text chunks png-info leaves out of `items` (A1111 leaves out the same kind: layout, not
# words); sdaccel's own JSON record stays in.
LAYOUT_KEYS = {"parameters", "exif", "dpi", "icc_profile", "transparency", "gamma", "srgb",
               "chromaticity", "aspect", "interlace", "loop", "duration", "background"}


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
    return [model.listing() for model in every_model(server.started, server.models_dir)]


@router.post("/refresh-checkpoints")
async def refresh_checkpoints():  # the folder is read on every listing
    return None


@router.post("/refresh-loras")
async def refresh_loras():
    return None


@router.get("/upscalers")
async def upscalers():
    """The hires fix's pixel upscalers (A1111's UpscalerItem); its latent ones are in
    latent-upscale-modes."""
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None,
             "scale": 4} for name in PIXEL_UPSCALERS]


@router.get("/latent-upscale-modes")
async def latent_upscale_modes():
    return [{"name": name} for name in HIRES_UPSCALER_NAMES if name not in PIXEL_UPSCALERS]


# Lists A1111 serves that sdaccel has nothing in (each checkpoint decodes with its own VAE; no
# face restorers, hypernetworks, saved styles, scripts or extensions): empty, as A1111 answers.
EMPTY_LISTS = ("sd-vae", "face-restorers", "realesrgan-models", "hypernetworks",
               "prompt-styles", "script-info", "extensions")


def _empty() -> list:
    return []


for _path in EMPTY_LISTS:
    router.add_api_route(f"/{_path}", _empty, methods=["GET"], name=_path)


@router.get("/scripts")
async def scripts():
    return {"txt2img": [], "img2img": []}


@router.get("/loras")
async def loras(server: ServerDep):
    return server.models_dir.loras() if server.models_dir else []


@router.get("/embeddings")
async def embeddings(server: ServerDep):
    return embeddings_listing(server.engine, server.models_dir)


@router.get("/cmd-flags")
async def cmd_flags(server: ServerDep) -> dict[str, Any]:
    """The A1111 command-line flags clients read: the API is on, the web UI is not, and where
    the models folder's parts are."""
    folders = {"ckpt_dir": CHECKPOINT_FOLDERS, "lora_dir": LORA_FOLDERS,
               "embeddings_dir": EMBEDDING_FOLDERS}
    root = server.models_dir.root if server.models_dir else None
    dirs = {key: next((str(root / n) for n in names if (root / n).is_dir()), None) if root
            else None for key, names in folders.items()}
    return {"api": True, "nowebui": True, "api_auth": None, "listen": False,
            "share": False, "medvram": False, "lowvram": False, "xformers": False,
            "no_half": False, "disable_safe_unpickle": False, "hide_ui_dir_config": True,
            "data_dir": str(root) if root else None, **dirs}


class PNGInfoRequest(BaseModel):
    image: str = ""


@router.post("/png-info")
async def png_info(request: Request, server: ServerDep):
    body = await body_of(request, PNGInfoRequest, server.limits)
    image = decode(body.image, "image", server.limits.max_image_pixels)
    info = image.info.get("parameters")
    items = {key: value for key, value in image.info.items()
             if isinstance(value, str) and key.lower() not in LAYOUT_KEYS}
    text = info if isinstance(info, str) else ""
    return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}
