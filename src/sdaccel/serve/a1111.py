"""AUTOMATIC1111's txt2img and img2img requests, as its clients send them, turned into our
settings.

Clients send the whole A1111 body with its defaults. Every field is sorted into one of three
kinds: honoured (prompt, seed, size, steps, sampler and schedule, eta where the sampler takes one,
guidance, batch, saving, the hires fix, init images and the inpaint fields), accepted because
at the value sent it does not change the picture (A1111 defaults; named in the `info` note when
set to something we ignore), or refused with a 422 naming the field, because honouring it would
change the picture in a way we cannot (face restoration, variation seeds, scripts, latent-noise
inpainting fill). Nothing is silently misapplied, but for the clip skip that clients send from
their own settings (`CLIP_stop_at_last_layers`: ignored, and named in the note).
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdaccel.catalogue import SAMPLER_TABLE, SAMPLERS, SCHEDULE_LABELS
from sdaccel.serve.checks import HIRES_FIELDS
from sdaccel.settings import HiresSettings, SamplerSettings

log = logging.getLogger("sdaccel.serve")

# A1111 label or our name, case-insensitive -> our sampler name.
SAMPLER_NAMES: dict[str, str] = {
    **{s.a1111.lower(): s.name for s in SAMPLER_TABLE},
    **{s.name.lower(): s.name for s in SAMPLER_TABLE},
}
# A1111's schedule type (the request's `scheduler`: its label or its /schedulers name, as
# "SGM Uniform" / "sgm_uniform"), or our name, case-insensitive -> sampler.schedule.
SCHEDULE_NAMES: dict[str, str] = {
    **{label.lower(): key for key, label in SCHEDULE_LABELS.items()},
    **{label.lower().replace(" ", "_"): key for key, label in SCHEDULE_LABELS.items()},
    **{key: key for key in SCHEDULE_LABELS},
}
# Before 1.9, A1111 named a sampler and its schedule in one: "DPM++ 2M Karras".
_COMBINED = {"karras": "karras", "exponential": "exponential"}


class A1111Request(BaseModel):
    """The fields AUTOMATIC1111's txt2img and img2img API bodies share: the same names and
    defaults."""

    model_config = ConfigDict(extra="allow")  # later A1111 versions add fields: see _ignored

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None  # the old name of sampler_name
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    script_name: str | None = None
    script_args: list[Any] | None = None
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False


class Txt2ImgRequest(A1111Request):
    """A1111's StableDiffusionProcessingTxt2Img API body."""

    denoising_strength: float | None = None  # the hires pass's (A1111: 0.75 when unset)
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(A1111Request):
    """A1111's StableDiffusionProcessingImg2Img API body."""

    init_images: list[Any] = Field(default_factory=list)  # base64 images or data: URIs
    resize_mode: int = 0
    denoising_strength: float | None = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur: int | None = None  # both of the next two when set
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class Unsupported(ValueError):
    """A field whose value would change the picture in a way this server cannot honour."""

    def __init__(self, field: str, value: Any, why: str) -> None:
        super().__init__(f"{field}={value!r}: {why}")
        self.field = field


# Fields that change the picture when set away from their default, and why we cannot.
_REFUSED = {
    "restore_faces": ((None, False), "face restoration is not implemented"),
    "tiling": ((None, False), "tileable images are not implemented"),
    "subseed_strength": (0.0, "variation seeds are not implemented"),
    "seed_resize_from_h": ((-1, 0), "resizing a seed is not implemented"),
    "seed_resize_from_w": ((-1, 0), "resizing a seed is not implemented"),
    "script_name": ((None, ""), "scripts are not implemented"),
    "alwayson_scripts": ({}, "extensions' scripts are not implemented"),
    "refiner_checkpoint": ((None, ""), "a refiner model is not implemented"),
    "s_churn": ((None, 0.0), "stochastic churn is not implemented"),
    "s_noise": ((None, 1.0), "a noise multiplier is not implemented"),
    "s_tmin": ((None, 0.0), "s_tmin is not implemented"),
    "s_tmax": ((None, 0.0, math.inf), "s_tmax is not implemented"),
    "s_min_uncond": ((None, 0.0), "negative guidance minimum sigma is not implemented"),
    # img2img
    "resize_mode": (0, "only resize mode 0 (just resize) is implemented; valid: 0"),
    "initial_noise_multiplier": ((None, 1.0), "a noise multiplier is not implemented"),
    "latent_mask": ((None, ""), "a separate latent mask is not implemented"),
}
# The override_settings keys honoured at these values; others that change the picture are
# refused, the rest ignored (listed in info's sdaccel_ignored, logged at debug level).
_OVERRIDES = {"eta_noise_seed_delta": (0,), "sd_vae": (None, "", "Automatic", "automatic", "None")}
# Accepted and ignored even where they would change the picture: sdaccel has no clip skip, and
# clients send it from their own settings (SillyTavern, Open WebUI).
_IGNORED_OVERRIDES = ("CLIP_stop_at_last_layers",)
# hr_upscaler (A1111's name, case-insensitive, or ours) -> hires.upscaler
HIRES_UPSCALERS = {"latent": "latent", "latent (nearest)": "latent-nearest",
                   "latent-nearest": "latent-nearest", "lanczos": "lanczos"}
HIRES_UPSCALER_NAMES = ("Latent", "Latent (nearest)", "Lanczos")
_SAME = (None, "", "Use same sampler", "Use same scheduler", "Use same checkpoint")
INPAINTING_FILLS = {0: "fill", 1: "original"}
# At strength 1 the masked area starts from noise (diffusers' inpainting, and so the engine),
# which is what A1111's latent noise (2) makes of it, and latent nothing (3) nearly.
LATENT_FILLS = {2: "latent noise", 3: "latent nothing"}


def sampler_for(request: A1111Request, default: SamplerSettings) -> SamplerSettings:
    """The request's sampler (steps aside, which the caller checks against its limits): its
    sampler_name (or sampler_index), scheduler and eta, else the server's own `default`."""
    name, schedule = _sampler_and_schedule(request, default)
    eta = _eta_for(request, name, default)
    try:
        return SamplerSettings(name=name, steps=default.steps, schedule=schedule, eta=eta)
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ")
        if "sampler.eta" in message or exc.errors()[0]["loc"] == ("eta",):
            raise Unsupported("eta", request.eta, message) from None
        raise Unsupported("scheduler", request.scheduler, message) from None


def _sampler_and_schedule(request: A1111Request, default: SamplerSettings) -> tuple[str, str]:
    """(sampler.name, sampler.schedule): A1111 1.9+ sends "DPM++ 2M" with scheduler "Karras",
    older clients "DPM++ 2M Karras". A request that names neither keeps the server's own."""
    label = (request.sampler_name or request.sampler_index or "").strip()
    asked = (request.scheduler or "").strip().lower()
    if asked and asked not in SCHEDULE_NAMES:
        valid = ", ".join(SCHEDULE_LABELS.values())
        raise Unsupported("scheduler", request.scheduler, f"unknown schedule type; valid: {valid}")
    schedule = SCHEDULE_NAMES.get(asked, "default")
    if not label:
        return default.name, schedule if asked else default.schedule
    if label.lower() in SAMPLER_NAMES:
        return SAMPLER_NAMES[label.lower()], schedule
    base, _, suffix = label.lower().rpartition(" ")
    if base in SAMPLER_NAMES and suffix in _COMBINED:
        if schedule not in ("default", _COMBINED[suffix]):
            raise Unsupported("scheduler", request.scheduler, f"sampler_name {label!r} names "
                              f"the {suffix} schedule already")
        return SAMPLER_NAMES[base], _COMBINED[suffix]
    valid = ", ".join(s.a1111 for s in SAMPLER_TABLE)
    raise Unsupported("sampler_name", label, f"unknown sampler; valid: {valid} (and the "
                      "older combined names, as DPM++ 2M Karras)")


def _eta_for(request: A1111Request, name: str, default: SamplerSettings) -> float | None:
    """sampler.eta for the request: its eta where the sampler's step takes one (A1111 applies
    it to DDIM too), else None; 0 and 1, A1111's own defaults, pass for the others."""
    if SAMPLERS[name].eta is None:
        if request.eta not in (None, 0.0, 1.0):
            raise Unsupported("eta", request.eta, f"sampler {SAMPLERS[name].a1111!r} takes no "
                              "eta; samplers that do: " + ", ".join(
                                  s.a1111 for s in SAMPLER_TABLE if s.eta is not None))
        return None
    if request.eta is None:
        return default.eta if name == default.name else None
    return request.eta


def check_request(request: A1111Request) -> list[str]:
    """Raise Unsupported for the first field we cannot honour; return the fields accepted but
    ignored (for the `info` note)."""
    for name, (defaults, why) in _REFUSED.items():
        if name not in type(request).model_fields:
            continue
        value = getattr(request, name)
        allowed = defaults if isinstance(defaults, tuple) else (defaults,)
        if value not in allowed:
            raise Unsupported(name, value, why)
    # Saved styles: prompt-styles lists none, and A1111 applies an unknown style as nothing.
    ignored = ["styles"] if request.styles else []
    if isinstance(request, Txt2ImgRequest) and not request.enable_hr and \
            request.denoising_strength not in (None, 0.0):
        ignored.append("denoising_strength")  # only used by the hires fix
    if isinstance(request, Img2ImgRequest):
        ignored += [name for name, default in (("image_cfg_scale", None), ("mask_round", True))
                    if getattr(request, name) != default]
    ignored += sorted(set(request.model_extra or {}))
    return ignored


def check_overrides(overrides: dict[str, Any]) -> tuple[str | None, list[str]]:
    """The checkpoint `override_settings` asks for (None: the server's current one) and the
    keys ignored; Unsupported for a value that would change the picture in a way we cannot."""
    ignored = []
    for key, value in overrides.items():
        if key in _OVERRIDES and value not in _OVERRIDES[key]:
            valid = ", ".join(repr(v) for v in _OVERRIDES[key] if v)
            raise Unsupported(f"override_settings.{key}", value, f"valid: {valid}")
        if key in _IGNORED_OVERRIDES and value in (1, None):
            continue
        if key not in _OVERRIDES and key != "sd_model_checkpoint":
            log.debug("override_settings.%s=%r ignored", key, value)
            ignored.append(f"override_settings.{key}")
    return overrides.get("sd_model_checkpoint") or None, ignored


def hires_for(request: Txt2ImgRequest) -> HiresSettings | None:
    """The hires fix a txt2img body asks for (enable_hr), or None."""
    if not request.enable_hr:
        return None
    for name, same_as in (("hr_prompt", request.prompt),
                          ("hr_negative_prompt", request.negative_prompt),
                          ("hr_sampler_name", request.sampler_name or request.sampler_index),
                          ("hr_scheduler", request.scheduler), ("hr_checkpoint_name", None)):
        value = getattr(request, name)
        if value not in (*_SAME, same_as):
            raise Unsupported(name, value, "a second pass with its own prompt, sampler or "
                              "checkpoint is not implemented; send it empty")
    upscaler = HIRES_UPSCALERS.get((request.hr_upscaler or "Latent").strip().lower())
    if upscaler is None:
        raise Unsupported("hr_upscaler", request.hr_upscaler,
                          f"valid: {', '.join(HIRES_UPSCALER_NAMES)}")
    strength = 0.75 if request.denoising_strength is None else request.denoising_strength
    try:
        return HiresSettings(enabled=True, scale=_hires_scale(request), upscaler=upscaler,
                             steps=request.hr_second_pass_steps, denoising_strength=strength)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = HIRES_FIELDS.get(str(error["loc"][0]) if error["loc"] else "", "enable_hr")
        value = getattr(request, field, None)
        raise Unsupported(field, value, error["msg"]) from None


def _hires_scale(request: Txt2ImgRequest) -> float:
    """hr_scale, or the scale hr_resize_x / hr_resize_y ask for (one of them: the other follows
    the aspect ratio; both: the same scale, as sdaccel does not crop)."""
    x, y = request.hr_resize_x, request.hr_resize_y
    if not x and not y:
        return request.hr_scale
    scales = [s for s in (x / request.width if x else None, y / request.height if y else None)
              if s is not None]
    if len(scales) == 2 and abs(scales[0] - scales[1]) * min(request.width, request.height) > 8:
        raise Unsupported("hr_resize_x", (x, y), f"{x}x{y} is not {request.width}x"
                          f"{request.height} scaled (cropping to another aspect ratio is not "
                          "implemented); send one of hr_resize_x / hr_resize_y, or hr_scale")
    return scales[0]


def inpaint_fields(request: Img2ImgRequest) -> tuple[int, int]:
    """(mask blur, inpainting_fill) of an img2img body, checked."""
    blur = request.mask_blur
    if blur is None:
        if request.mask_blur_x != request.mask_blur_y:
            raise Unsupported("mask_blur_x", request.mask_blur_x, "a blur other than "
                              "mask_blur_y is not implemented; send mask_blur")
        blur = request.mask_blur_x
    if blur < 0:
        raise Unsupported("mask_blur", blur, "must be 0 or more")
    fill = request.inpainting_fill
    if fill not in INPAINTING_FILLS and not (fill in LATENT_FILLS
                                             and request.denoising_strength == 1):
        raise Unsupported("inpainting_fill", fill, "valid: 0 (fill), 1 (original); 2 (latent "
                          "noise) and 3 (latent nothing) only at denoising_strength 1, where the "
                          "masked area starts from noise")
    if request.inpaint_full_res_padding < 0:
        raise Unsupported("inpaint_full_res_padding", request.inpaint_full_res_padding,
                          "must be 0 or more")
    return blur, request.inpainting_fill


def info_text(request: A1111Request, sampler_label: str, seeds: list[int], model_name: str,
              model_hash: str | None, infotexts: list[str], ignored: list[str],
              denoising_strength: float | None = None) -> dict[str, Any]:
    """A1111's `info` (sent as a JSON string): the fields its clients read."""
    n = len(seeds)
    return {
        "prompt": request.prompt, "all_prompts": [request.prompt] * n,
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * n,
        "seed": seeds[0] if seeds else request.seed, "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
        "width": request.width, "height": request.height, "sampler_name": sampler_label,
        "cfg_scale": request.cfg_scale, "steps": request.steps,
        "batch_size": request.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model_name, "sd_model_hash": model_hash,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": denoising_strength, "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [], "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "sdaccel_ignored": ignored,
    }


# A1111's infotext: the last line's `Key: value` pairs ("quoted" values may hold commas).
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def parse_infotext(text: str) -> dict[str, Any]:
    """A PNG's `parameters` text as A1111's png-info parses it: Prompt, Negative prompt, then
    every `Key: value` of the last line (`Size: WxH` as Size-1 and Size-2)."""
    *lines, last = (text or "").strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in (line.strip() for line in lines):
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    parsed: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                value = value[1:-1]
        if size := _SIZE.match(str(value)):
            parsed[f"{key}-1"], parsed[f"{key}-2"] = size.group(1), size.group(2)
        else:
            parsed[key] = value
    return parsed
