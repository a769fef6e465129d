"""Settings: the seed's YAML schema as pydantic-settings models, their layering and validation.

Layers, lowest first: packaged preset < --config FILE < SDACCEL_* environment (nested with "__")
< command-line flags < --set dotted.key=value. Each layer is read into a nested dict, the dicts are
merged, and the merge remembers which layer set every key, so that a validation error can name
the file (or variable, or flag) that holds the bad value and `inspect-config` can show where each
value came from. Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from sdaccel.catalogue import (
    ESTIMATORS,
    PER_STEP,
    REPLANNABLE,
    SAMPLER_NAMES,
    SAMPLERS,
    SCHEDULES,
    SIGMA_SCHEDULES,
    TAKE_ETA,
)
from sdaccel.errors import ConfigError, LoraError

DEFAULT_PRESET = "tiny"
ENV_PREFIX = "SDACCEL_"
# SDACCEL_* variables that configure the tool itself rather than a generation.
NON_SETTINGS_ENV = {"SDACCEL_CACHE_DIR"}
# The seed's configs/ file names keep working.
PRESET_ALIASES = {
    "base_sd15": "base",
    "sd15_fp32_ddpm50": "fp32-ddpm50",
    "sd15_mix_bf16_int8_ddpm50": "mix-bf16-int8",
    "sd15_mix_bf16_int8_compile_ddpm50": "mix-bf16-int8-compile",
    "sd15_mix_bf16_int8_dpm10": "mix-bf16-int8-dpm10",
}

# "auto" (not in the seed): the fastest precision this device runs natively, chosen by the
# engine (engine/loading/precision.py: choose_precision); `inspect-config` shows the choice and why.
Precision = Literal["fp32", "fp16", "bf16", "auto"]
TextEncoderPrecision = Literal["fp32", "fp16", "bf16", "int8", "auto"]
SamplerName = Literal[SAMPLER_NAMES]  # type: ignore[valid-type]
ScheduleName = Literal[SCHEDULES]  # type: ignore[valid-type]
EstimatorName = Literal[ESTIMATORS]  # type: ignore[valid-type]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CompileSettings(_Section):
    """`torch.compile` of the UNet (and optionally the VAE decode), the seed's section. If
    compilation fails the run continues eagerly, with a warning."""

    enabled: bool = Field(False, description="Compile the UNet with `torch.compile`. The first "
                          "call compiles (minutes for SD 1.5); `sdaccel compile-cache warm` "
                          "stores the result for a fast second start.")
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        Field("reduce-overhead", description="`torch.compile` mode. `reduce-overhead` and "
              "`max-autotune` use CUDA graphs; a new prompt or seed causes no recompilation.")
    )
    fullgraph: bool = Field(False, description="`torch.compile(fullgraph=...)`: fail rather "
                            "than split the graph at code dynamo cannot trace.")
    dynamic: bool = Field(False, description="`torch.compile(dynamic=...)`. With `false`, a new "
                          "image size or a prompt longer than one 75-token chunk (a longer "
                          "text context) compiles the UNet again.")
    compile_vae: bool = Field(False, description="Also compile the VAE decode (or the tiny "
                              "decoder).")
    cache: bool = Field(True, description="Not in the seed. Load matching `sdaccel "
                        "compile-cache` entries before compiling (`generate`, `bench` and "
                        "`serve` all do); an entry from other versions or another device is "
                        "skipped with a warning.")
    freezing: bool = Field(False, description="Not in the seed. Inductor freezing: the weights "
                           "become constants of the compiled graph, folded and pre-packed for "
                           "oneDNN. On SD 1.5, 1.2-1.7x over eager fp32 on a Xeon with AMX, "
                           "nothing (0.94-1.08x) on an AVX2-only EPYC; no faster than eager "
                           "bf16 on the CPUs measured. A LoRA switch then compiles the UNet "
                           "again (packed weights are copies an in-place switch does not "
                           "reach): keep the LoRA set fixed. Frozen graphs are stored in the "
                           "compile cache like any other (`random:tiny` 64x64: a start takes "
                           "16.6 s warm against 52.4 s cold).")


class OptimizeSettings(_Section):
    """Speed passes beyond the seed, one key each; the defaults change nothing. Each key's
    description is the one place its trade-off is written: what the pass does, what it gained
    where it was measured (device and size named), and its quality risk, measured by `sdaccel
    bench` against the diffusers baseline. Passes that cannot act on this device or with these
    settings say so in a warning and the run goes on without them.
    """

    channels_last: bool = Field(False, description="NHWC memory layout for the UNet and VAE "
                                "convolutions (faster cuDNN/inductor kernels on tensor cores). "
                                "Risk: float reassociation only (fp32 latents within ~1e-5). "
                                "With `fuse_qkv`, in the `cpu` preset: 1.04x per SD 1.5 step on "
                                "a Xeon with AMX, 1.00x on a Zen 4.")
    fuse_qkv: bool = Field(False, description="One matmul for query, key and value of every "
                           "self-attention (key and value of every cross-attention): diffusers' "
                           "`fuse_qkv_projections`, with its fused SDPA processor. A LoRA "
                           "switch rebuilds the fused projections from the LoRA'd weights. "
                           "Risk: float reassociation only (the same weights, concatenated; "
                           "with `channels_last`, the bundled model's image is 86.6 dB from the "
                           "plain one).")
    attention: Literal["sdpa", "flash", "efficient", "math", "chunked"] = Field(
        "sdpa", description="The attention kernel. Attention always goes through PyTorch's "
        "scaled-dot-product attention (diffusers' `AttnProcessor2_0`, as "
        "`StableDiffusionPipeline`); `sdpa` lets PyTorch pick the kernel, `flash`, `efficient` "
        "(memory-efficient) and `math` force one, and a kernel the device lacks is an error "
        "naming this key. `chunked` (CPU only): bf16 attention with 256 or more keys as oneDNN "
        "matrix products over 512 queries at a time instead of PyTorch's fused CPU kernel; on a "
        "Zen 4 (`examples/cpu_attention.py`) 2.2x per 4096-token SD 1.5 self-attention, 1.8x at "
        "1024 tokens, 3.5x for the VAE's; short keys (0.75x) and fp32 (0.8-0.9x) are slower "
        "that way, so fp32, masked and cross-attention calls stay with SDPA, and on a CPU with "
        "AMX every call does (PyTorch's kernel computes on AMX tiles there and was 1.8-2.9x "
        "faster than chunked on a Xeon; `inspect-config` says so). Risk: `flash`/`efficient` "
        "sum the softmax in another order (fp32 differences ~1e-6, fp16 within its rounding); "
        "`math` is the reference "
        "and slowest; `chunked` rounds the softmax to bf16 (UNet output 1.05e-2 from fp32, as "
        "plain bf16).")
    vae_tiling: bool = Field(False, description="Decode the VAE in overlapping tiles "
                             "(diffusers' `enable_tiling`): bounded memory at large sizes. "
                             "Ignored with a warning when `tiny_decoder` is set. Risk: faint "
                             "seams where tiles blend, only for images larger than one tile "
                             "(512 px for SD 1.5); smaller images decode unchanged.")
    inductor_flags: bool = Field(False, description="The inductor options of diffusers' "
                                 "fast-inference guide (`conv_1x1_as_mm`, "
                                 "`coordinate_descent_tuning`, `epilogue_fusion=False`, "
                                 "`coordinate_descent_check_all_directions`), passed with each "
                                 "compile call, never set globally; only with "
                                 "`compile.enabled`. Risk: none beyond float reassociation; "
                                 "longer compiles.")
    prepack_weights: bool = Field(False, description="CPU only, without compile "
                                  "(`compile.freezing` does it inside a compiled graph): every "
                                  "linear and convolution weight of the UNet and VAE packed once "
                                  "into oneDNN's layout instead of reordered on every call; "
                                  "packed again when a weight changes (a LoRA switch repacks "
                                  "only what it changed). The packing happens in the first call "
                                  "(about 3 s for SD 1.5). Per SD 1.5 UNet step on a Zen 4 "
                                  "EPYC: bf16 1.5x at 256x256, 1.1x at 512x512; fp32 2.3x at "
                                  "256x256. Costs a second copy of those weights in memory "
                                  "(+1.7 GB for SD 1.5 in bf16). Risk: none beyond float "
                                  "reassociation (fp32 UNet output within 3e-6 of unpacked; "
                                  "bf16 as close to fp32 as eager bf16 is).")
    reuse_freed_memory: bool = Field(False, description="CPU, Linux (glibc): the C allocator "
                                     "keeps freed memory for the next UNet call (`mallopt`: no "
                                     "mmap'd blocks, no trimming) instead of handing every "
                                     "activation back to the OS and page-faulting fresh zeroed "
                                     "pages in at the next call. Per SD 1.5 UNet step in bf16 on "
                                     "a Xeon: 1.13x at 256x256, 1.15x at 512x512 (A/B rounds in "
                                     "one process). Process-wide: it holds for every allocation "
                                     "of the process, which keeps its peak memory until it "
                                     "ends; elsewhere a warning says it does nothing. Risk: none "
                                     "to the image.")


class SamplerSettings(_Section):
    """The solver and its plan, the seed's section (`schedule` and `eta` are not in the seed).
    Each sampler takes the schedules and eta its catalogue entry names (the samplers
    reference); anything else is an error naming the key and what is valid."""

    name: SamplerName = Field("dpm_solver++", description="The sampler (solver), a diffusers "
                              "scheduler built over the model's own scheduler config; see the "
                              "samplers reference for each one's class, A1111 label, schedules "
                              "and eta.")
    steps: int = Field(20, ge=1, le=1000, description="Solver steps. Heun takes 2 UNet calls "
                       "a step (2n - 1 for n steps); an image's `nfe` and `cost` count UNet "
                       "calls. Not used by `adaptive.mode: replan`, which picks each image's "
                       "total between `min_steps` and `max_steps`.")
    schedule: ScheduleName = Field("default", description="Not in the seed. The noise "
                                   "schedule: `default` (the model's own scheduler config; "
                                   "A1111's \"Automatic\"), `karras` / `exponential` "
                                   "(`use_karras_sigmas` / `use_exponential_sigmas`) or "
                                   "`trailing` (`timestep_spacing=\"trailing\"`, A1111's "
                                   "\"SGM Uniform\").")
    eta: float | None = Field(None, ge=0, le=1, description="Not in the seed. The noise each "
                              "step adds back, for the samplers whose step takes one (`ddim`, "
                              "default 0; `tcd`, default 0.3, the TCD paper's gamma); `null`: "
                              "the sampler's own default.")

    @model_validator(mode="after")
    def _the_sampler_takes_them(self) -> SamplerSettings:
        if problem := sampler_problem(self):
            raise ValueError(problem)
        return self

    @property
    def eta_in_force(self) -> float | None:
        """The eta the sampler's step takes: sampler.eta, else the sampler's own default;
        None for a sampler whose step takes none."""
        return SAMPLERS[self.name].eta if self.eta is None else self.eta


class Problem(str):
    """A one-line reason settings cannot be honoured, and the dotted key it is about (`key`):
    a plain string to every reader, and the key of the ConfigError raised for it."""

    key: str

    def __new__(cls, key: str, message: str) -> Problem:
        problem = super().__new__(cls, message)
        problem.key = key
        return problem

    def __getnewargs__(self) -> tuple[str, str]:  # pickle and copy rebuild it with its key
        return self.key, str(self)


def sampler_problem(sampler: SamplerSettings) -> Problem | None:
    """Why the sampler cannot honour its schedule or eta, in one line; None when it can."""
    entry = SAMPLERS[sampler.name]
    if sampler.schedule not in entry.schedules:
        why = f" ({entry.own_schedule})" if entry.own_schedule else ""
        return Problem("sampler.schedule", f"sampler.schedule {sampler.schedule!r} is not "
                       f"available with sampler.name {sampler.name!r}; valid: "
                       f"{', '.join(entry.schedules)}{why}")
    if sampler.eta is not None and entry.eta is None:
        return Problem("sampler.eta", f"sampler.eta {sampler.eta:g}: sampler.name "
                       f"{sampler.name!r} takes no eta; valid: null, or a sampler that takes one "
                       f"({', '.join(TAKE_ETA)})")
    return None


def adaptive_problem(adaptive: AdaptiveSettings, sampler: SamplerSettings) -> Problem | None:
    """Why the adaptive mode cannot run with this sampler, in one line; None when it can."""
    if not adaptive.enabled:
        return None
    entry = SAMPLERS[sampler.name]
    why = f": {entry.not_adaptive}" if entry.not_adaptive else ""
    if adaptive.mode == "per_step":
        if entry.per_step:
            return None
        return Problem("adaptive.mode", f"adaptive.mode per_step cannot use sampler.name "
                       f"{sampler.name!r}{why} (valid: {', '.join(PER_STEP)}; or "
                       "adaptive.enabled false)")
    if not entry.replannable:
        other = ("or adaptive.mode per_step, which works with it" if entry.per_step
                 else "or adaptive.enabled false")
        return Problem("adaptive.mode", f"adaptive.mode replan needs a sampler that can "
                       f"re-plan mid-trajectory; sampler.name {sampler.name!r} cannot{why} "
                       f"(valid: {', '.join(REPLANNABLE)}; {other})")
    if sampler.schedule in SIGMA_SCHEDULES:
        valid = [k for k in entry.schedules if k not in SIGMA_SCHEDULES]
        return Problem("adaptive.mode", f"adaptive.mode replan hands the scheduler a new "
                       f"timestep list, which diffusers refuses with sampler.schedule "
                       f"{sampler.schedule!r} (it sets its own sigmas); valid with replan: "
                       f"{', '.join(valid)}")
    return None


class UncertaintySettings(_Section):
    """`adaptive.mode: replan` (the seed's scheme): the score that picks each image's total of
    steps after the warm-up, and the thresholds that map it to `min_steps`..`max_steps`."""

    method: EstimatorName = Field("pred_var", description="`pred_var` (the seed's name): the "
                                  "variance of the predicted clean latents x0 across the "
                                  "warm-up evaluations, over the variance of the latest x0; "
                                  "`solver_error`: the local error estimate of a second-order "
                                  "multistep solver at the last warm-up step. Neither costs a "
                                  "UNet evaluation.")
    threshold_low: float = Field(0.10, ge=0, description="A score at or below this gets "
                                 "`min_steps`; linear in between, rounded half up.")
    threshold_high: float = Field(0.25, ge=0, description="A score at or above this gets "
                                  "`max_steps`.")

    @model_validator(mode="after")
    def _ordered(self) -> UncertaintySettings:
        if self.threshold_low > self.threshold_high:
            raise ValueError(
                f"threshold_low ({self.threshold_low}) must not exceed "
                f"threshold_high ({self.threshold_high})"
            )
        return self


class SkipSettings(_Section):
    """mode per_step: skip a UNet call where the trajectory is smooth, filling the step from the
    solver's history. Risk: a threshold set too high skips where the
    picture still changes; bench and examples/frontier.py measure it."""

    threshold: float = Field(0.0, ge=0, description="Skip the next step when the "
                             "extrapolation error of x0 (relative L2, scaled to the next step) "
                             "is below this; 0: never skip.")
    max_consecutive: int = Field(1, ge=1, description="At most this many skipped steps in a "
                                 "row.")
    final_steps: int = Field(1, ge=0, description="The last steps always run the full UNet. "
                             "Keep it at 1 or more: caching on a 10-step plan with a shallow "
                             "last step broke down entirely (2.8% aligned).")


class CacheSettings(_Section):
    """mode per_step: DeepCache-style feature caching: a full UNet
    call every `interval` steps, in between only the shallow branch at skip level `level`
    (0: conv_in and the last up layer; higher: more layers, closer to the full UNet), on deep
    features extrapolated from the last two full calls (or reused as they are). Risk: the
    shallow branch's output drifts from the full UNet's as the features age."""

    interval: int = Field(1, ge=1, description="A full UNet every N steps, the shallow "
                          "branch between; 1: no caching.")
    level: int = Field(0, ge=0, description="Skip level of the shallow branch: at level L it "
                       "runs `conv_in`, the first L down layers and the last L + 1 up layers "
                       "(0: `conv_in` and the last up layer; 6.1% of a full SD 1.5 UNet's "
                       "FLOPs, 9.6% on the bundled model).")
    threshold: float | None = Field(None, ge=0, description="Refresh with a full call before "
                                    "`interval` when the skip test's scaled error exceeds "
                                    "this; `null`: never.")
    forecast: bool = Field(True, description="Extrapolate the deep features from the last two "
                           "full calls (TaylorSeer's first-order forecast), which stays closer "
                           "to the plain run at the same cost; `false`: reuse the last ones as "
                           "they are (DeepCache's rule).")


class GuidanceSettings(_Section):
    """mode per_step: fewer unconditional UNet halves. Between refreshes every `interval` steps
    the guidance direction (cond - uncond) is extrapolated from the last two (or reused); after
    `cutoff` (a fraction of the steps) or once |cond - uncond| / |cond| < `agree_threshold` the
    unconditional half stops and the conditional prediction is used alone (guidance 1 from
    there, as diffusers' callback). Risk: guidance reuse drifts where the direction turns."""

    interval: int = Field(1, ge=1, description="The unconditional half every N steps; 1: "
                          "at every step.")
    cutoff: float = Field(1.0, ge=0, le=1, description="After this fraction of the steps, no "
                          "unconditional half; 1: never cut off.")
    agree_threshold: float = Field(0.0, ge=0, description="Per image, no unconditional half "
                                   "once |cond - uncond| / |cond| falls below this; 0: never.")
    forecast: bool = Field(True, description="Between refreshes, extrapolate cond - uncond from "
                           "the last two; `false`: reuse the last.")


class AdaptiveSettings(_Section):
    """Adaptive compute, the seed's section. `mode: per_step` (not in the seed) keeps the
    sampler's plan and lets each image decide per step what the UNet computes (`skip`, `cache`,
    `guidance`); `mode: replan` (the seed's scheme) gives each image its own total of steps
    after a warm-up. The adaptive compute guide has the evidence for each."""

    enabled: bool = Field(False, description="Turn adaptive compute on (the scheme `mode` "
                          "names).")
    mode: Literal["replan", "per_step"] = Field("replan", description="`per_step`: per-step "
                                                "decisions (skip, cache, guidance), what saves "
                                                "compute; `replan`: the seed's re-planned totals "
                                                "(the default, so that a seed YAML means what it "
                                                "meant). Heun, LCM and TCD take neither; "
                                                "`replan` needs a sampler that can re-plan.")
    warmup_steps: int = Field(5, ge=1, description="`replan`: UNet evaluations before the "
                              "decision (part of every plan); `per_step`: the first steps "
                              "always run the full UNet.")
    min_steps: int = Field(5, ge=1, description="`replan` only: the fewest steps an image gets "
                           "(warm-up included).")
    max_steps: int = Field(20, ge=1, le=1000, description="`replan` only: the most steps an "
                           "image gets; every image starts on this plan.")
    uncertainty: UncertaintySettings = UncertaintySettings()  # replan only
    skip: SkipSettings = SkipSettings()  # per_step only
    cache: CacheSettings = CacheSettings()  # per_step only
    guidance: GuidanceSettings = GuidanceSettings()  # per_step only

    @model_validator(mode="after")
    def _ordered(self) -> AdaptiveSettings:
        if self.mode != "replan":
            return self
        if self.min_steps > self.max_steps:
            raise ValueError(
                f"min_steps ({self.min_steps}) must not exceed max_steps ({self.max_steps})"
            )
        if self.warmup_steps > self.min_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must not exceed min_steps "
                f"({self.min_steps}): the warm-up is part of every plan"
            )
        return self


LORA_SUFFIXES = (".safetensors", ".pt", ".bin")
BUNDLED_LORAS = Path(__file__).resolve().parent / "bundled" / "loras"


def split_lora(text: str) -> tuple[str, float]:
    """`FILE` or `FILE:WEIGHT` (as `--lora` takes it) -> (file, weight), weight 1.0 when none.

    The weight is what follows the last ':' when that is a number, so `C:\\x.safetensors` and
    `C:\\x.safetensors:0.7` both work. A last part that is not a number belongs to the file name,
    unless the part before it is an existing file or ends in a LoRA suffix (`x.safetensors:abc`):
    then it is a weight that is not a number, an error naming the file. A file whose own name
    ends in ':<number>' is written with its weight: `odd:1.safetensors` needs nothing,
    `name:2` is written `name:2:1`."""
    head, sep, tail = text.rpartition(":")
    if not (sep and head):
        return text, 1.0
    try:
        weight = float(tail)
    except ValueError:
        weight = None
    if weight is not None and math.isfinite(weight):
        return head, weight
    if weight is not None or (not Path(text).exists() and (
            Path(head).is_file() or head.lower().endswith(LORA_SUFFIXES))):
        raise LoraError(f"LoRA {head!r}: weight {tail!r} is not a number (write FILE or "
                        f"FILE:WEIGHT, e.g. {head}:0.8)")
    return text, 1.0


class LoraEntry(_Section):
    """A LoRA file: kohya/A1111 (`lora_unet_...`) or diffusers/PEFT format;
    its weight (A1111's `<lora:name:weight>`: 1 as trained, 0 off, negative allowed) and,
    optionally, the file's sha256 (an image's metadata records it; a different file is then an
    error). Written as a mapping or as the string FILE[:WEIGHT], split at the last ':' when
    what follows is a number (so Windows paths work)."""

    path: Path = Field(description="The LoRA file: `.safetensors`, or `.pt` / `.bin` read "
                       "with `torch.load(weights_only=True)` only.")
    weight: float = Field(1.0, description="Multiplies the LoRA on the UNet and the text "
                          "encoder alike: 1 as trained, 0 off, negative allowed.")
    sha256: str | None = Field(None, description="The file's sha256; when set, a different "
                               "file at that path is refused (images' metadata records it).")

    @field_validator("path", mode="before")
    @classmethod
    def _bundled_file(cls, value: Any) -> Any:
        """`bundled:NAME`: a LoRA shipped in the package (src/sdaccel/bundled/loras/), so that
        a preset can name one wherever sdaccel is installed."""
        name = str(value).removeprefix("bundled:")
        if name == str(value):
            return value
        path = BUNDLED_LORAS / f"{name}.safetensors"
        if not path.is_file():
            valid = ", ".join(sorted(f"bundled:{p.stem}" for p in BUNDLED_LORAS.glob(
                "*.safetensors")))
            raise LoraError(f"LoRA {str(value)!r}: no such bundled LoRA; valid: {valid}")
        return path

    @model_validator(mode="before")
    @classmethod
    def _file_and_weight(cls, value: Any) -> Any:
        if isinstance(value, (str, Path)):
            path, weight = split_lora(str(value))
            return {"path": path, "weight": weight}
        if isinstance(value, dict) and "weight" in value:
            weight = value["weight"]
            try:
                number = float(weight)
            except (TypeError, ValueError):
                number = math.nan
            if isinstance(weight, bool) or not math.isfinite(number):
                raise LoraError(f"LoRA {str(value.get('path'))!r}: weight {weight!r} is not a "
                                "number")
        return value


class GenerationSettings(_Section):
    """What each image is, the seed's section."""

    height: int = Field(512, ge=8, le=4096, description="Image height in pixels: a multiple of "
                        "8, and of what the model's latent grid needs.")
    width: int = Field(512, ge=8, le=4096, description="Image width in pixels, as `height`.")
    guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance (CFG) "
                                  "scale; at 1 or below the unconditional pass is skipped (half "
                                  "the UNet work), as diffusers does.")
    num_images_per_prompt: int = Field(1, ge=1, le=64, description="Images per prompt, made as "
                                       "one batch; image k of a run uses seed + k.")
    strength: float = Field(0.75, gt=0, le=1, description="Not in the seed. With an init image "
                            "(image to image, inpainting): how much of it is drawn again, "
                            "AUTOMATIC1111's denoising strength. The sampler runs the last "
                            "`strength` x steps of its plan, from the image's latents noised to "
                            "that point (as diffusers' img2img pipeline); 1 starts from noise.")

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            nearest = max(1, round(value / 8)) * 8
            raise ValueError(f"must be a multiple of 8, got {value} (nearest: {nearest})")
        return value


class HiresSettings(_Section):
    """Not in the seed. AUTOMATIC1111's hires fix: generate at the settings' size, upscale, then
    draw the upscaled image again at `denoising_strength` (an image-to-image pass) for detail a
    model cannot give at the larger size in one pass."""

    enabled: bool = Field(False, description="Run the second, upscaled pass.")
    scale: float = Field(2.0, gt=1, le=4, description="Upscale factor of the second pass; its "
                         "size is rounded to what the model's latent grid needs.")
    upscaler: Literal["latent", "latent-nearest", "lanczos"] = Field(
        "latent", description="`latent`: the first pass's latents, bilinear (A1111's "
        "\"Latent\"); `latent-nearest`: nearest-neighbour (\"Latent (nearest)\"); `lanczos`: "
        "the decoded image resized with Lanczos and encoded again (\"Lanczos\").")
    steps: int = Field(0, ge=0, le=1000, description="Steps of the second pass's plan (it runs "
                       "`denoising_strength` of them); 0: the sampler's own steps.")
    denoising_strength: float = Field(0.7, gt=0, le=1, description="How much of the upscaled "
                                      "image the second pass draws again.")


class IOSettings(_Section):
    """Where images go, the seed's section. Files are `img_{index:03d}_steps{steps}.png`; the
    index continues after the images already there, and nothing is ever overwritten."""

    out_dir: Path = Field(Path("outputs"), description="The output folder (created if "
                          "missing; a path that is a file is an error before any model "
                          "loads).")
    save_latents: bool = Field(False, description="Also write each image's final latents as "
                               "`img_..._stepsN.latents.safetensors`.")
    save_grid: bool = Field(False, description="Also write a grid of the run's images, "
                            "`grid_{first}-{last}.png` (not with `--prompts-file`).")

    @field_validator("out_dir")
    @classmethod
    def _a_folder(cls, out_dir: Path) -> Path:
        # Found before a model loads, not when the first image is written.
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"{str(out_dir)!r} is a file; give a folder (it is created if "
                             "missing)")
        return out_dir


class PromptSettings(_Section):
    """How prompt text is read. weighting: AUTOMATIC1111's syntax,
    (word:1.3), (word) x1.1, [word] /1.1, \\( \\) for literal brackets, BREAK, and prompts
    beyond the text encoder's window as chained chunks; a prompt without that syntax gives the
    same embeddings as diffusers. false: the text as diffusers reads it, cut at the window (with
    a warning)."""

    weighting: bool = Field(True, description="Read AUTOMATIC1111's prompt syntax (weights, "
                            "`BREAK`, long prompts as chained chunks); `false`: brackets are "
                            "text, `BREAK` a word, and a prompt beyond the window is cut, with a "
                            "warning.")


class EmbeddingEntry(_Section):
    """A textual-inversion embedding: its file (.pt, .safetensors,
    .bin, or a diffusers folder), the token prompts use (default: the file's own token in the
    diffusers format, else the file's stem, as A1111 names it) and, optionally, the file's
    sha256 (an image's metadata records it; a different file is then an error)."""

    path: Path = Field(description="The embedding: AUTOMATIC1111's `.pt` or `.safetensors`, "
                       "diffusers' `learned_embeds.safetensors` / `.bin`, or the folder "
                       "holding one.")
    token: str | None = Field(None, description="The word prompts use for it (one word); "
                              "`null`: the diffusers file's own token, else the file's stem.")
    sha256: str | None = Field(None, description="The file's sha256; when set, a different "
                               "file at that path is refused (images' metadata records it).")

    @model_validator(mode="before")
    @classmethod
    def _a_path_alone(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, (str, Path)) else value

    @field_validator("token")
    @classmethod
    def _one_word(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(c.isspace() for c in value)):
            raise ValueError(f"a token is one word without spaces, got {value!r}")
        return value


class Settings(BaseSettings):
    """Everything one generation run needs: the seed's YAML schema, key for key (a file written
    for the original scripts loads unchanged), and keys beyond it, each with a default that
    keeps the old meaning."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    model_id: str = Field("bundled:shapes", description="The model: a hub id `org/name` or "
                          "`org/name@revision` (offline, from the local Hugging Face cache), a "
                          "local diffusers folder, a single `.safetensors` / `.ckpt` file in "
                          "SD 1.5's original layout, `random:tiny` / `random:sd15` (the "
                          "architecture with random weights seeded 0, for tests and speed), or "
                          "`bundled:shapes` (the small model shipped in the package).")
    device: str = Field("cpu", description="`cpu`, `cuda`, `cuda:N`, or `auto` (CUDA when "
                        "present, else the CPU). A device this machine lacks is an error "
                        "(exit code 4).")
    unet_dtype: Precision = Field("fp32", description="UNet precision. `auto` (not in the "
                                  "seed): on CUDA bf16 where the GPU has it, else fp16; on a "
                                  "CPU with native bf16 (AMX, AVX512-BF16, Arm BF16) bf16, on "
                                  "any other CPU fp32 (emulated bf16 is slower than fp32). "
                                  "Weights are cast once, never autocast per call; latents and "
                                  "solver stay fp32.")
    vae_dtype: Precision = Field("fp32", description="VAE (or tiny decoder) precision; `auto` "
                                 "as for `unet_dtype`.")
    text_encoder_dtype: TextEncoderPrecision = Field(
        "fp32", description="Text encoder precision. `int8`: every `nn.Linear` becomes "
        "bitsandbytes' `Linear8bitLt` (LLM.int8(), outlier threshold 6.0); on `random:tiny` the "
        "text embeddings stay within 2.5% relative error of fp32. `auto`: as for `unet_dtype`, "
        "but fp32 on a CPU (one call per image).")
    seed: int = Field(42, ge=0, lt=2**63, description="Seed of a run's first image; image k "
                      "uses seed + k, each from its own CPU generator, so any image can be "
                      "made again alone.")
    compile: CompileSettings = CompileSettings()
    optimize: OptimizeSettings = OptimizeSettings()
    sampler: SamplerSettings = SamplerSettings()
    adaptive: AdaptiveSettings = AdaptiveSettings()
    generation: GenerationSettings = GenerationSettings()
    hires: HiresSettings = HiresSettings()
    io: IOSettings = IOSettings()
    loras: list[LoraEntry] = Field([], description="Not in the seed. LoRA files fused into the "
                                   "weights, each `FILE`, `FILE:WEIGHT` or a mapping; none by "
                                   "default. A flag's list (`--lora`) replaces this one.")
    prompt: PromptSettings = PromptSettings()
    embeddings: list[EmbeddingEntry] = Field([], description="Not in the seed. "
                                             "Textual-inversion embeddings, each a path or a "
                                             "mapping; none by default. A flag's list "
                                             "(`--embedding`) replaces this one.")
    tiny_decoder: str | None = Field(None, description="Not in the seed. Decode with a tiny "
                                     "decoder (TAESD, diffusers' `AutoencoderTiny`) instead of "
                                     "the model's VAE: TAESD's `taesd_decoder.safetensors` (or "
                                     "`.pth`), a diffusers `AutoencoderTiny` folder, or a hub id "
                                     "in the local cache (`madebyollin/taesd`); `null`: the "
                                     "model's VAE.")

    @field_validator("tiny_decoder")
    @classmethod
    def _a_decoder_or_none(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("give a TAESD file, an AutoencoderTiny folder or a hub id "
                             "(e.g. madebyollin/taesd), or null for the model's own VAE")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?|auto", value):
            raise ValueError(f"unknown device {value!r}; valid: cpu, cuda, cuda:N, auto")
        return value

    @model_validator(mode="after")
    def _adaptive_mode_fits_the_sampler(self) -> Settings:
        if problem := adaptive_problem(self.adaptive, self.sampler):
            raise ValueError(problem)
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **_other_sources):
        # Layering is done by resolve_settings(), which needs to know where each value came
        # from; the model itself only validates what it is given.
        return (init_settings,)


# --------------------------------------------------------------------------- presets


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("sdaccel.presets").iterdir()
                  if p.name.endswith(".yaml"))


def canonical_preset(name: str) -> str:
    """Accept a preset name, a seed file name (sd15_mix_bf16_int8_ddpm50[.yaml])."""
    stem = Path(name).name.removesuffix(".yaml").removesuffix(".yml")
    stem = PRESET_ALIASES.get(stem, stem)
    if stem not in preset_names():
        valid = ", ".join(preset_names() + sorted(PRESET_ALIASES))
        raise ConfigError(f"unknown preset {name!r}; valid presets: {valid}")
    return stem


def preset_description(name: str) -> str:
    """The preset's first comment line says what it is for."""
    first = _preset_file(name).read_text().splitlines()[0]
    return first.lstrip("# ").strip()


def _preset_file(name: str):
    return resources.files("sdaccel.presets") / f"{canonical_preset(name)}.yaml"


# --------------------------------------------------------------------------- layers


@dataclass
class Layer:
    """One source of values: its name as shown to the user, and what it sets."""

    name: str
    values: dict[str, Any]


@dataclass
class ResolvedSettings:
    settings: Settings
    sources: dict[str, str] = field(default_factory=dict)  # dotted key -> layer name
    preset: str = DEFAULT_PRESET


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping of settings, got {type(data).__name__}")
    return data


def preset_layer(name: str) -> Layer:
    canonical = canonical_preset(name)
    return Layer(f"preset {canonical}", _read_yaml(_preset_file(canonical).read_text(),
                                                   f"preset {canonical}"))


def config_layer(path: Path) -> Layer:
    # pydantic-settings' YAML source skips a missing file silently; a user's typo must not.
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    return Layer(str(path), _read_yaml(path.read_text(), f"config file {str(path)!r}"))


def env_layer(environ: dict[str, str] | None = None) -> Layer:
    environ = dict(os.environ if environ is None else environ)
    known = _dotted_keys(Settings)
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var in NON_SETTINGS_ENV:
            continue
        key = var[len(ENV_PREFIX):].lower().replace("__", ".")
        if key not in known:
            raise ConfigError(
                f"environment variable {var}: no setting {key!r}; "
                f"valid keys: {', '.join(sorted(known))} (as SDACCEL_SECTION__KEY)", key=key
            )
    source = EnvSettingsSource(Settings, case_sensitive=False)
    source.env_vars = {k.lower(): v for k, v in environ.items()}
    return Layer("environment", source())


def flags_layer(flags: dict[str, Any]) -> Layer:
    """Command-line shorthand flags, given as {dotted.key: value}; None means not given."""
    values: dict[str, Any] = {}
    for key, value in flags.items():
        if value is not None:
            _set_dotted(values, key, value)
    return Layer("command-line flag", values)


def set_layer(assignments: list[str]) -> Layer:
    values: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. sampler.steps=12")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            problem = str(exc).splitlines()[0]
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem}); "
                              f"quote a string, e.g. {key.strip()}='\"{raw}\"'",
                              key=key.strip()) from None
        _set_dotted(values, key.strip(), value)
    return Layer("--set", values)


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        node = target.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section", key=key)
        target = node
    target[leaf] = value


def _dotted_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _dotted_keys(annotation, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def _merge(layers: list[Layer]) -> tuple[dict[str, Any], dict[str, str]]:
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def walk(target: dict[str, Any], values: dict[str, Any], prefix: str, layer: str) -> None:
        for key, value in values.items():
            dotted = f"{prefix}{key}"
            sources[dotted] = layer
            if isinstance(value, dict) and isinstance(target.get(key, {}), dict):
                walk(target.setdefault(key, {}), value, dotted + ".", layer)
            else:
                target[key] = value

    for layer in layers:
        walk(merged, layer.values, "", layer.name)
    return merged, sources


# --------------------------------------------------------------------------- resolution


def resolve_settings(
    preset: str | None = None,
    config: Path | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    environ: dict[str, str] | None = None,
) -> ResolvedSettings:
    """Merge every layer, validate, and remember which layer set each key."""
    preset = canonical_preset(preset or DEFAULT_PRESET)
    layers = [preset_layer(preset)]
    if config is not None:
        layers.append(config_layer(Path(config)))
    layers += [env_layer(environ), flags_layer(flags or {}), set_layer(overrides or [])]
    return _validated(layers, preset)


def layer_over(settings: Settings, flags: dict[str, Any] | None = None,
               overrides: list[str] | None = None) -> ResolvedSettings:
    """Shorthand flags and --set values over settings built in code (bench's Settings rows):
    the same layering, with `settings` in place of preset, config file and environment."""
    layers = [Layer("given settings", settings_as_dict(settings)), flags_layer(flags or {}),
              set_layer(overrides or [])]
    return _validated(layers, "settings")


def _validated(layers: list[Layer], preset: str) -> ResolvedSettings:
    merged, sources = _merge(layers)
    try:
        settings = Settings(**merged)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, sources), key=_error_key(exc.errors()[0])) from None
    return ResolvedSettings(settings, _leaf_sources(settings, sources), preset)


def _error_key(error: dict[str, Any]) -> str | None:
    """The dotted key a validation error is about: where it was found, or, for a check across
    keys (a Problem), the key the problem names."""
    cause = error.get("ctx", {}).get("error")
    if cause is not None and cause.args and isinstance(cause.args[0], Problem):
        return cause.args[0].key
    return ".".join(str(part) for part in error["loc"]) or None


def _leaf_sources(settings: Settings, sources: dict[str, str]) -> dict[str, str]:
    """Every leaf key of the schema -> the layer that set it, or 'default'."""
    return {key: sources.get(key, "default") for key in sorted(_dotted_keys(Settings))}


def _explain(exc: ValidationError, sources: dict[str, str]) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        key = ".".join(loc)
        where = _source_of(loc, sources)
        if error["type"] == "extra_forbidden":
            section = _section_model(loc[:-1])
            valid = ", ".join(section.model_fields) if section else "?"
            where_in = f" in {'.'.join(loc[:-1])}" if loc[:-1] else ""
            message = f"unknown key; valid keys{where_in}: {valid}"
        else:
            message = error["msg"].removeprefix("Value error, ")
            if "input" in error and error["type"] != "value_error" and not isinstance(
                error["input"], dict
            ):
                message += f" (got {error['input']!r})"
        lines.append(f"{where}: {key or 'settings'}: {message}" if key else f"{where}: {message}")
    return "invalid settings:\n  " + "\n  ".join(lines) if len(lines) > 1 else (
        "invalid settings: " + lines[0]
    )


def _source_of(loc: list[str], sources: dict[str, str]) -> str:
    """The layer that set this key, or the closest enclosing section that a layer set."""
    for end in range(len(loc), 0, -1):
        dotted = ".".join(loc[:end])
        if dotted in sources:
            return sources[dotted]
    return "settings"


def _section_model(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Settings
    for part in loc:
        info = model.model_fields.get(part)
        if info is None or not (isinstance(info.annotation, type)
                                and issubclass(info.annotation, BaseModel)):
            return None
        model = info.annotation
    return model


def settings_as_dict(settings: Settings) -> dict[str, Any]:
    """Plain, YAML/JSON-ready values (paths as strings)."""
    return settings.model_dump(mode="json")
