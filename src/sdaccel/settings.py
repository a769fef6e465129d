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
    enabled: bool = False
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        "reduce-overhead"
    )
    fullgraph: bool = False
    dynamic: bool = False
    compile_vae: bool = False
    # Not in the seed: load matching `sdaccel compile-cache` entries before compiling.
    cache: bool = True
    # Not in the seed: inductor freezing. The weights become constants of the compiled graph,
    # folded and pre-packed for oneDNN: 1.2-1.7x over eager fp32 on SD 1.5 on a Xeon with AMX,
    # nothing (0.94-1.08x) on an AVX2-only EPYC. A LoRA switch then compiles again.
    freezing: bool = False


class OptimizeSettings(_Section):
    """Speed passes beyond the seed, one flag each (see sdaccel.engine.speed.optimize). The defaults
    change nothing. Quality risk of each, measured by `sdaccel bench` against the fp32 baseline:

    - channels_last: NHWC memory layout for the UNet and VAE convolutions. Risk: none beyond
      float reassociation (fp32 latents within ~1e-5).
    - fuse_qkv: one matmul for the query/key/value projections of self-attention (diffusers'
      fuse_qkv_projections). Risk: none beyond float reassociation.
    - attention: scaled-dot-product attention kernel: "sdpa" lets PyTorch pick (the default),
      "flash", "efficient" (memory-efficient) or "math" force one. Risk: flash/efficient
      reorder the softmax sums (tiny differences); a kernel the device lacks is an error.
      "chunked" (CPU only): bf16 self-attention as oneDNN matrix products over chunks of 512
      queries, 2.2x faster than PyTorch's fused CPU kernel per SD 1.5 4096-token attention on a
      Zen 4; fp32 and short-key (cross-) attention stay with SDPA, and so does everything on a
      CPU with AMX, where SDPA is the faster one. Risk: the softmax is rounded to bf16 (UNet
      output within bf16's own distance of fp32).
    - vae_tiling: decode the VAE in overlapping tiles (diffusers' enable_tiling). Saves memory at
      large sizes; risk: faint seams where tiles blend, only for images larger than one tile
      (512 px for SD 1.5); smaller images decode unchanged.
    - inductor_flags: the torch inductor options of diffusers' fast-inference guide
      (conv_1x1_as_mm, coordinate_descent_tuning, epilogue_fusion off, coordinate descent in all
      directions); only with compile.enabled. Risk: none beyond float reassociation; longer
      compiles.
    - prepack_weights: the UNet's and VAE's linear and convolution weights packed once for
      oneDNN (CPU only, without compile: freezing does it inside a compiled graph). Per SD
      1.5 UNet step on a Zen 4 EPYC: bf16 1.5x at 256x256, 1.1x at 512x512; fp32 2.3x at
      256x256. Costs a second copy of those weights in memory. Risk: none beyond float
      reassociation.
    - reuse_freed_memory: glibc's malloc keeps freed memory for the next UNet call instead of
      returning it to the OS and page-faulting it in afresh (CPU, Linux; sdaccel.engine.speed.heap).
      Per SD 1.5 UNet step in bf16 on a Xeon: 1.13x at 256x256, 1.15x at 512x512. Risk: none
      to the image; process-wide, and the process keeps its peak memory until it ends.
    """

    channels_last: bool = False
    fuse_qkv: bool = False
    attention: Literal["sdpa", "flash", "efficient", "math", "chunked"] = "sdpa"
    vae_tiling: bool = False
    inductor_flags: bool = False
    prepack_weights: bool = False
    reuse_freed_memory: bool = False


class SamplerSettings(_Section):
    name: SamplerName = "dpm_solver++"
    steps: int = Field(20, ge=1, le=1000)
    # Not in the seed: the noise schedule, "default" being the model's own scheduler config
    # (karras / exponential sigmas, trailing timestep spacing: catalogue.SCHEDULE_OPTIONS), and
    # the eta of samplers whose step takes one (ddim, tcd; null: the sampler's own default).
    # Each sampler takes the schedules and eta its catalogue entry names.
    schedule: ScheduleName = "default"
    eta: float | None = Field(None, ge=0, le=1)

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


def sampler_problem(sampler: SamplerSettings) -> str | None:
    """Why the sampler cannot honour its schedule or eta, in one line; None when it can."""
    entry = SAMPLERS[sampler.name]
    if sampler.schedule not in entry.schedules:
        why = f" ({entry.own_schedule})" if entry.own_schedule else ""
        return (f"sampler.schedule {sampler.schedule!r} is not available with sampler.name "
                f"{sampler.name!r}; valid: {', '.join(entry.schedules)}{why}")
    if sampler.eta is not None and entry.eta is None:
        return (f"sampler.eta {sampler.eta:g}: sampler.name {sampler.name!r} takes no eta; "
                f"valid: null, or a sampler that takes one ({', '.join(TAKE_ETA)})")
    return None


def adaptive_problem(adaptive: AdaptiveSettings, sampler: SamplerSettings) -> str | None:
    """Why the adaptive mode cannot run with this sampler, in one line; None when it can."""
    if not adaptive.enabled:
        return None
    entry = SAMPLERS[sampler.name]
    why = f": {entry.not_adaptive}" if entry.not_adaptive else ""
    if adaptive.mode == "per_step":
        if entry.per_step:
            return None
        return (f"adaptive.mode per_step cannot use sampler.name {sampler.name!r}{why} "
                f"(valid: {', '.join(PER_STEP)}; or adaptive.enabled false)")
    if not entry.replannable:
        other = ("or adaptive.mode per_step, which works with it" if entry.per_step
                 else "or adaptive.enabled false")
        return (f"adaptive.mode replan needs a sampler that can re-plan mid-trajectory; "
                f"sampler.name {sampler.name!r} cannot{why} (valid: {', '.join(REPLANNABLE)}; "
                f"{other})")
    if sampler.schedule in SIGMA_SCHEDULES:
        valid = [k for k in entry.schedules if k not in SIGMA_SCHEDULES]
        return (f"adaptive.mode replan hands the scheduler a new timestep list, which diffusers "
                f"refuses with sampler.schedule {sampler.schedule!r} (it sets its own sigmas); "
                f"valid with replan: {', '.join(valid)}")
    return None


class UncertaintySettings(_Section):
    # pred_var: spread of the predicted clean image over the warm-up; solver_error: the
    # multistep solver's local error estimate (see engine/sampling/adaptive.py).
    method: EstimatorName = "pred_var"
    threshold_low: float = Field(0.10, ge=0)
    threshold_high: float = Field(0.25, ge=0)

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
    solver's history (engine/sampling/stepwise.py). Risk: a threshold set too high skips where the
    picture still changes; bench and examples/frontier.py measure it."""

    # Skip when the extrapolation error of x0 (relative L2, scaled to the next step) is below.
    threshold: float = Field(0.0, ge=0)  # 0: never skip
    max_consecutive: int = Field(1, ge=1)
    final_steps: int = Field(1, ge=0)  # the last steps always run the full UNet


class CacheSettings(_Section):
    """mode per_step: DeepCache-style feature caching (sampling/feature_cache.py): a full UNet
    call every `interval` steps, in between only the shallow branch at skip level `level`
    (0: conv_in and the last up layer; higher: more layers, closer to the full UNet), on deep
    features extrapolated from the last two full calls (or reused as they are). Risk: the
    shallow branch's output drifts from the full UNet's as the features age."""

    interval: int = Field(1, ge=1)  # 1: no caching
    level: int = Field(0, ge=0)
    # Refresh before `interval` when the skip test's scaled error exceeds this (null: never).
    threshold: float | None = Field(None, ge=0)
    # Extrapolate the deep features from the last two full calls (TaylorSeer's first order)
    # rather than reuse the last ones as they are (DeepCache's rule: false).
    forecast: bool = True


class GuidanceSettings(_Section):
    """mode per_step: fewer unconditional UNet halves. Between refreshes every `interval` steps
    the guidance direction (cond - uncond) is extrapolated from the last two (or reused); after
    `cutoff` (a fraction of the steps) or once |cond - uncond| / |cond| < `agree_threshold` the
    unconditional half stops and the conditional prediction is used alone (guidance 1 from
    there, as diffusers' callback). Risk: guidance reuse drifts where the direction turns."""

    interval: int = Field(1, ge=1)  # 1: the unconditional half at every step
    cutoff: float = Field(1.0, ge=0, le=1)  # 1: never cut off
    agree_threshold: float = Field(0.0, ge=0)  # 0: never
    # Between refreshes, extrapolate cond - uncond from the last two (false: reuse the last).
    forecast: bool = True


class AdaptiveSettings(_Section):
    enabled: bool = False
    # replan: the seed's scheme (a warm-up, then a per-image total of steps); per_step: the
    # sampler's own plan, each image deciding per step what the UNet computes (skip, cache,
    # guidance below; engine/sampling/stepwise.py).
    mode: Literal["replan", "per_step"] = "replan"
    warmup_steps: int = Field(5, ge=1)  # per_step: the first steps always run the full UNet
    min_steps: int = Field(5, ge=1)  # replan only
    max_steps: int = Field(20, ge=1, le=1000)  # replan only
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
    """A LoRA file (engine/lora.py): kohya/A1111 (`lora_unet_...`) or diffusers/PEFT format;
    its weight (A1111's `<lora:name:weight>`: 1 as trained, 0 off, negative allowed) and,
    optionally, the file's sha256 (an image's metadata records it; a different file is then an
    error). Written as a mapping or as the string FILE[:WEIGHT] (see split_lora)."""

    path: Path
    weight: float = 1.0
    sha256: str | None = None

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
    height: int = Field(512, ge=8, le=4096)
    width: int = Field(512, ge=8, le=4096)
    guidance_scale: float = Field(7.5, ge=0)
    num_images_per_prompt: int = Field(1, ge=1, le=64)

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            nearest = max(1, round(value / 8)) * 8
            raise ValueError(f"must be a multiple of 8, got {value} (nearest: {nearest})")
        return value


class IOSettings(_Section):
    out_dir: Path = Path("outputs")
    save_latents: bool = False
    save_grid: bool = False

    @field_validator("out_dir")
    @classmethod
    def _a_folder(cls, out_dir: Path) -> Path:
        # Found before a model loads, not when the first image is written.
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"{str(out_dir)!r} is a file; give a folder (it is created if "
                             "missing)")
        return out_dir


class PromptSettings(_Section):
    """How prompt text is read (engine/text/prompts.py). weighting: AUTOMATIC1111's syntax,
    (word:1.3), (word) x1.1, [word] /1.1, \\( \\) for literal brackets, BREAK, and prompts
    beyond the text encoder's window as chained chunks; a prompt without that syntax gives the
    same embeddings as diffusers. false: the text as diffusers reads it, cut at the window (with
    a warning)."""

    weighting: bool = True


class EmbeddingEntry(_Section):
    """A textual-inversion embedding (engine/text/embeddings.py): its file (.pt, .safetensors,
    .bin, or a diffusers folder), the token prompts use (default: the file's own token in the
    diffusers format, else the file's stem, as A1111 names it) and, optionally, the file's
    sha256 (an image's metadata records it; a different file is then an error)."""

    path: Path
    token: str | None = None
    sha256: str | None = None

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
    """Everything one generation run needs; the seed's YAML schema, key for key."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    model_id: str = "bundled:shapes"
    device: str = "cpu"
    unet_dtype: Precision = "fp32"
    vae_dtype: Precision = "fp32"
    text_encoder_dtype: TextEncoderPrecision = "fp32"
    seed: int = Field(42, ge=0, lt=2**63)
    compile: CompileSettings = CompileSettings()
    optimize: OptimizeSettings = OptimizeSettings()
    sampler: SamplerSettings = SamplerSettings()
    adaptive: AdaptiveSettings = AdaptiveSettings()
    generation: GenerationSettings = GenerationSettings()
    io: IOSettings = IOSettings()
    # Not in the seed: LoRA files fused into the weights (engine/lora.py); none by default.
    loras: list[LoraEntry] = []
    # Not in the seed: prompt syntax and textual-inversion embeddings.
    prompt: PromptSettings = PromptSettings()
    embeddings: list[EmbeddingEntry] = []
    # Not in the seed: decode with a tiny decoder (TAESD, diffusers' AutoencoderTiny) instead
    # of the model's VAE (engine/loading/decoders.py): a diffusers AutoencoderTiny folder, TAESD's
    # taesd_decoder.safetensors (or .pth), or a hub id in the local cache. None: the full VAE.
    tiny_decoder: str | None = None

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
                f"valid keys: {', '.join(sorted(known))} (as SDACCEL_SECTION__KEY)"
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
                              f"quote a string, e.g. {key.strip()}='\"{raw}\"'") from None
        _set_dotted(values, key.strip(), value)
    return Layer("--set", values)


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        node = target.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
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
        raise ConfigError(_explain(exc, sources)) from None
    return ResolvedSettings(settings, _leaf_sources(settings, sources), preset)


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
