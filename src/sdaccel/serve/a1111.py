"""AUTOMATIC1111's txt2img request, as its clients send it, turned into our jobs.

Clients send the whole A1111 body with its defaults. Every field is sorted into one of three
kinds: honoured (prompt, seed, size, steps, sampler and schedule, eta where the sampler takes one,
guidance, batch, saving), accepted because
at the value sent it does not change the picture (A1111 defaults; named in the `info` note when
set to something we ignore), or refused with a 422 naming the field, because honouring it would
change the picture in a way we cannot (hires fix, face restoration, variation seeds, scripts).
Nothing is silently misapplied.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdaccel.catalogue import SAMPLER_TABLE, SAMPLERS, SCHEDULE_LABELS
from sdaccel.settings import SamplerSettings

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


class Txt2ImgRequest(BaseModel):
    """A1111's StableDiffusionProcessingTxt2Img API body: the same names and defaults."""

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
    denoising_strength: float | None = None
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
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    script_name: str | None = None
    script_args: list[Any] | None = None
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False


class Unsupported(ValueError):
    """A field whose value would change the picture in a way this server cannot honour."""

    def __init__(self, field: str, value: Any, why: str) -> None:
        super().__init__(f"{field}={value!r}: {why}")
        self.field = field


# Fields that change the picture when set away from their default, and why we cannot.
_REFUSED = {
    "enable_hr": (False, "hires fix (a second, upscaled pass) is not implemented"),
    "restore_faces": ((None, False), "face restoration is not implemented"),
    "tiling": ((None, False), "tileable images are not implemented"),
    "subseed_strength": (0.0, "variation seeds are not implemented"),
    "seed_resize_from_h": ((-1, 0), "resizing a seed is not implemented"),
    "seed_resize_from_w": ((-1, 0), "resizing a seed is not implemented"),
    "styles": ([], "saved styles are not implemented"),
    "script_name": ((None, ""), "scripts are not implemented"),
    "alwayson_scripts": ({}, "extensions' scripts are not implemented"),
    "refiner_checkpoint": ((None, ""), "a refiner model is not implemented"),
    "s_churn": ((None, 0.0), "stochastic churn is not implemented"),
    "s_noise": ((None, 1.0), "a noise multiplier is not implemented"),
    "s_tmin": ((None, 0.0), "s_tmin is not implemented"),
    "s_tmax": ((None, 0.0, math.inf), "s_tmax is not implemented"),
    "s_min_uncond": ((None, 0.0), "negative guidance minimum sigma is not implemented"),
}
# The override_settings keys a client may send at their default.
_OVERRIDES = {"CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0}


def sampler_for(request: Txt2ImgRequest, default: SamplerSettings) -> SamplerSettings:
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


def _sampler_and_schedule(request: Txt2ImgRequest, default: SamplerSettings) -> tuple[str, str]:
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


def _eta_for(request: Txt2ImgRequest, name: str, default: SamplerSettings) -> float | None:
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


def check_request(request: Txt2ImgRequest, model_name: str) -> list[str]:
    """Raise Unsupported for the first field we cannot honour; return the fields accepted but
    ignored (for the `info` note)."""
    for name, (defaults, why) in _REFUSED.items():
        value = getattr(request, name)
        allowed = defaults if isinstance(defaults, tuple) else (defaults,)
        if value not in allowed:
            raise Unsupported(name, value, why)
    ignored = []
    for key, value in request.override_settings.items():
        if key == "sd_model_checkpoint":
            if value not in (model_name, None, ""):
                raise Unsupported(f"override_settings.{key}", value,
                                  f"this server runs {model_name!r} only")
        elif key in _OVERRIDES:
            if value != _OVERRIDES[key]:
                raise Unsupported(f"override_settings.{key}", value, "not implemented")
        else:
            ignored.append(f"override_settings.{key}")
    if request.denoising_strength not in (None, 0.0):
        ignored.append("denoising_strength")  # only used by img2img and hires fix
    ignored += sorted(set(request.model_extra or {}))
    return ignored


def info_text(request: Txt2ImgRequest, sampler_label: str, seeds: list[int], model_name: str,
              model_hash: str | None, infotexts: list[str], ignored: list[str]
              ) -> dict[str, Any]:
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
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": None,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts,
        "styles": [], "clip_skip": 1, "is_using_inpainting_conditioning": False,
        "sdaccel_ignored": ignored,
    }
