"""Benchmark runner and its report; also the seed's Python API `benchmark(cfg, prompts, ...)`.

Every configuration is measured beside a **baseline run in the same process**: a plain
`diffusers.StableDiffusionPipeline` built from a separately loaded fp32 copy of the same model
(fp16 on request), with the same sampler class, steps, size, guidance and seeds (one CPU
generator per image, as the engine draws them). Each configuration's images are compared with
the baseline's images of the same prompt and seed (PSNR/SSIM from `sdaccel.metrics`), so a
speed-up is always shown beside what it cost in fidelity.

Per configuration: load time, compile/first-call time, UNet steps/s (denoising loop only: the
time between the first and the last step, synchronised on CUDA), seconds per image (median and
p90 over the timed calls), images/s, peak memory during the timed calls (CUDA peak allocated; on
CPU the process' peak RSS), NFE per image, speed-up against its baseline's median, PSNR and
SSIM. Warm-up calls are never counted. A configuration whose worst image falls below
`min_psnr` or `min_ssim` is flagged as drifting.

This module prints nothing: progress goes to an `on_progress` callback, results are returned.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdaccel.errors import ConfigError, SdaccelError
from sdaccel.settings import ResolvedSettings, Settings, canonical_preset, resolve_settings

log = logging.getLogger(__name__)

# The seed's three default prompts (scripts/run_benchmark.py).
DEFAULT_PROMPTS = ("a photo of a cat", "a futuristic city at sunset", "a watercolor landscape")
# Drift bounds on the worst image of a configuration against the baseline's image of the same
# prompt and seed. 30 dB / 0.95 is where differences stop being invisible side by side on SD 1.5
# (fp16 vs fp32 eager is typically above both; an int8 text encoder or a sampler change is not).
MIN_PSNR_DB = 30.0
MIN_SSIM = 0.95
PSNR_CAP_DB = 100.0  # identical images (infinite PSNR) count as this in means and files


@dataclass(frozen=True)
class BenchProgress:
    """One step of the run, for a front end to show: `done` of `total` calls of `phase`."""

    label: str
    phase: str  # "load" | "warm-up" | "timed"
    done: int
    total: int


@dataclass
class BenchConfig:
    label: str
    settings: Settings


@dataclass
class Row:
    label: str
    kind: str  # "baseline" | "config"
    baseline: str  # label of the baseline it is compared with (itself for a baseline)
    model: str
    device: str
    sampler: str
    steps: int
    height: int
    width: int
    guidance: float
    batch: int
    precision: str
    compile: str
    passes: str
    iters: int
    warmup: int
    load_seconds: float
    first_call_seconds: float
    unet_steps_per_s: float | None
    seconds_per_image_median: float
    seconds_per_image_p90: float
    images_per_s: float
    peak_memory_bytes: int
    memory_kind: str
    nfe: float
    compile_cache_entries: int = 0
    speedup: float | None = None
    psnr_db: float | None = None
    ssim: float | None = None
    psnr_min_db: float | None = None
    ssim_min: float | None = None
    drift: bool = False
    notes: str = ""  # the engine's warnings during the run (e.g. a compile fallback)


@dataclass
class BenchReport:
    rows: list[Row]
    prompts: list[str]
    iters: int
    warmup: int
    device_name: str
    versions: dict[str, str]
    min_psnr: float = MIN_PSNR_DB
    min_ssim: float = MIN_SSIM
    memory_note: str = ""
    images: dict[str, list] = field(default_factory=dict, repr=False)  # label -> PIL images

    def row(self, label: str) -> Row:
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(f"no row {label!r}; rows: {', '.join(r.label for r in self.rows)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_name": self.device_name, "versions": self.versions,
            "prompts": self.prompts, "iters": self.iters, "warmup": self.warmup,
            "bounds": {"min_psnr_db": self.min_psnr, "min_ssim": self.min_ssim,
                       "psnr_cap_db": PSNR_CAP_DB},
            "memory_note": self.memory_note,
            "rows": [asdict(r) for r in self.rows],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write_csv(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = list(asdict(self.rows[0]))
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=names)
            writer.writeheader()
            for row in self.rows:
                writer.writerow(asdict(row))
        return path

    def plot(self, path: Path) -> Path:
        """Speed-up against fidelity (PSNR to the baseline), one point per configuration."""
        try:
            import matplotlib
        except ImportError:
            raise ConfigError("--plot needs matplotlib: pip install 'sdaccel[plot]'") from None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        configs = [r for r in self.rows if r.label != r.baseline]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in configs:
            colour = "tab:red" if r.drift else "tab:blue"
            ax.scatter(r.psnr_db, r.speedup, color=colour, s=40)
            ax.annotate(r.label, (r.psnr_db, r.speedup), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.axvline(self.min_psnr, color="tab:red", linewidth=0.8, linestyle=":")
        ax.set_xlabel(f"PSNR to the diffusers baseline, dB (identical = {PSNR_CAP_DB:g})")
        ax.set_ylabel("speed-up vs baseline (median s/image)")
        ax.set_title(f"sdaccel bench on {self.device_name}: red = below fidelity bound",
                     fontsize=9)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


# --------------------------------------------------------------------------- configurations


ConfigSpec = str | Path | Settings | ResolvedSettings | tuple[str, Any]


def resolve_configs(configs: ConfigSpec | Sequence[ConfigSpec],
                    overrides: Sequence[str] = (),
                    flags: dict[str, Any] | None = None) -> list[BenchConfig]:
    """Preset names, YAML paths (the seed's configs/<name>.yaml names work even where the file
    is not there), Settings objects, or (label, any of those) pairs -> labelled settings, with
    `overrides` (dotted.key=value) and shorthand `flags` applied to each."""
    if isinstance(configs, (str, Path, Settings, ResolvedSettings)):
        configs = [configs]
    resolved = []
    for spec in configs:
        label = None
        if isinstance(spec, tuple):
            label, spec = spec
        config = _resolve_one(spec, list(overrides), flags)
        resolved.append(BenchConfig(label or config.label, config.settings))
    seen: dict[str, int] = {}
    for config in resolved:  # labels name rows: keep them unique
        seen[config.label] = seen.get(config.label, 0) + 1
        if seen[config.label] > 1:
            config.label = f"{config.label}#{seen[config.label]}"
    return resolved


def _resolve_one(spec, overrides: list[str], flags) -> BenchConfig:
    if isinstance(spec, ResolvedSettings):
        spec = spec.settings
    if isinstance(spec, Settings):
        settings = spec.model_copy(deep=True)
        if overrides or flags:
            base = resolve_settings(overrides=overrides, flags=flags, environ={})
            # Only the keys the overrides name change the given settings.
            for key, source in base.sources.items():
                if source in ("--set", "command-line flag"):
                    _assign(settings, key, _get(base.settings, key))
        return BenchConfig("settings", settings)
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        resolved = resolve_settings(config=path, flags=flags, overrides=overrides)
        return BenchConfig(path.stem, resolved.settings)
    try:
        preset = canonical_preset(str(spec))
    except ConfigError:
        if path.suffix in (".yaml", ".yml"):
            raise ConfigError(f"config file {str(spec)!r} does not exist (nor is "
                              f"{path.stem!r} a preset name)") from None
        raise
    resolved = resolve_settings(preset, flags=flags, overrides=overrides)
    return BenchConfig(preset, resolved.settings)


def _get(settings: Settings, dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _assign(settings: Settings, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    target: Any = settings
    for part in parents:
        target = getattr(target, part)
    setattr(target, leaf, value)


# --------------------------------------------------------------------------- measurement


@dataclass
class _Run:
    """What one timed run (baseline or configuration) produced."""

    load_seconds: float
    first_call_seconds: float
    call_seconds: list[float]
    steps_per_s: list[float]
    images: list  # PIL, timed calls only, in call order
    nfe: float
    batch: int
    peak: Any
    cache_entries: int = 0
    passes: str = ""
    notes: str = ""


def _plan(settings: Settings, prompts: Sequence[str], calls: int) -> list[tuple[str, int]]:
    """(prompt, seed) of every call: prompts in turn, call i seeded seed + i x batch, so the
    baseline and every configuration draw exactly the same noise."""
    batch = settings.generation.num_images_per_prompt
    return [(prompts[i % len(prompts)], settings.seed + i * batch) for i in range(calls)]


def _steps(settings: Settings) -> int:
    # An adaptive run starts on the max_steps plan: its reference is the full plan.
    return settings.adaptive.max_steps if settings.adaptive.enabled else settings.sampler.steps


def _step_clock(device: str) -> tuple[list[float], Callable[[], None]]:
    from sdaccel.gpu_stats import synchronize

    marks: list[float] = []

    def mark() -> None:
        synchronize(device)
        marks.append(time.perf_counter())

    return marks, mark


def _rate(marks: list[float]) -> float | None:
    if len(marks) < 2 or marks[-1] <= marks[0]:
        return None
    return (len(marks) - 1) / (marks[-1] - marks[0])


def _timed_calls(call, plan, warmup: int, label: str, on_progress, device: str):
    from sdaccel import gpu_stats

    first = None
    seconds, rates, images = [], [], []
    for index, (prompt, seed) in enumerate(plan):
        timed = index >= warmup
        if index == warmup:
            gc.collect()
            gpu_stats.reset_peak(device)
        started = time.perf_counter()
        results, marks = call(prompt, seed)
        gpu_stats.synchronize(device)
        elapsed = time.perf_counter() - started
        if first is None:
            first = elapsed
        if timed:
            seconds.append(elapsed)
            rate = _rate(marks)
            if rate is not None:
                rates.append(rate)
            images.extend(results)
        phase, done, total = ("timed", index - warmup + 1, len(plan) - warmup) if timed else (
            "warm-up", index + 1, warmup)
        on_progress(BenchProgress(label, phase, done, total))
    return first or 0.0, seconds, rates, images, gpu_stats.peak(device)


def _run_engine(config: BenchConfig, prompts, iters, warmup, on_progress) -> _Run:
    from sdaccel.engine.engine import Engine
    from sdaccel.events import StepDone, Warning

    settings = config.settings
    on_progress(BenchProgress(config.label, "load", 0, 1))
    device = _device(settings)
    marks, mark = _step_clock(device)
    notes: list[str] = []

    def on_event(event) -> None:
        if isinstance(event, StepDone):
            mark()
        elif isinstance(event, Warning) and event.message not in notes:
            notes.append(event.message)

    started = time.perf_counter()
    engine = Engine(settings, on_event=on_event)
    load = time.perf_counter() - started
    nfe: list[int] = []

    def call(prompt: str, seed: int):
        marks.clear()
        results = engine.generate([prompt], seed=seed)
        nfe.extend(r.nfe for r in results)
        return [r.image for r in results], list(marks)

    plan = _plan(settings, prompts, warmup + iters)
    first, seconds, rates, images, peak = _timed_calls(call, plan, warmup, config.label,
                                                       on_progress, device)
    run = _Run(load, first, seconds, rates, images, statistics.fmean(nfe),
               settings.generation.num_images_per_prompt, peak,
               len(getattr(engine, "compile_cache", [])), ", ".join(engine.passes),
               "; ".join(notes))
    return run


def _run_baseline(settings: Settings, dtype: str, label: str, prompts, iters, warmup,
                  on_progress) -> _Run:
    import torch
    from diffusers import StableDiffusionPipeline

    from sdaccel.engine.models import load_components
    from sdaccel.engine.precision import DTYPES, resolve_device
    from sdaccel.engine.samplers import build_scheduler

    on_progress(BenchProgress(label, "load", 0, 1))
    device = resolve_device(settings.device)
    started = time.perf_counter()
    parts = load_components(settings.model_id, device=str(device))  # its own fp32 copy
    pipe = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
        unet=parts.unet, scheduler=build_scheduler(settings.sampler.name,
                                                   parts.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).to(device=device, dtype=DTYPES[dtype])
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - started
    g = settings.generation
    batch = g.num_images_per_prompt
    steps = _steps(settings)
    marks, mark = _step_clock(str(device))

    def on_step_end(_pipe, _index, _t, kwargs):
        mark()
        return kwargs

    def call(prompt: str, seed: int):
        marks.clear()
        generators = [torch.Generator("cpu").manual_seed(seed + k) for k in range(batch)]
        out = pipe(prompt, negative_prompt="", num_inference_steps=steps,
                   guidance_scale=g.guidance_scale, height=g.height, width=g.width,
                   num_images_per_prompt=batch, generator=generators,
                   callback_on_step_end=on_step_end)
        return list(out.images), list(marks)

    plan = _plan(settings, prompts, warmup + iters)
    first, seconds, rates, images, peak = _timed_calls(call, plan, warmup, label, on_progress,
                                                       str(device))
    nfe = steps * (2 if g.guidance_scale > 1.0 else 1)
    return _Run(load, first, seconds, rates, images, float(nfe), batch, peak)


def _device(settings: Settings) -> str:
    from sdaccel.engine.precision import resolve_device

    return str(resolve_device(settings.device))


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _baseline_key(settings: Settings, dtype: str) -> tuple:
    g = settings.generation
    return (settings.model_id, _device(settings), settings.sampler.name, _steps(settings),
            g.height, g.width, g.guidance_scale, g.num_images_per_prompt, settings.seed, dtype)


def _row(label: str, kind: str, baseline: str, settings: Settings, run: _Run, iters: int,
         warmup: int, precision: str, compile_: str) -> Row:
    g = settings.generation
    per_image = [s / run.batch for s in run.call_seconds]
    return Row(
        label=label, kind=kind, baseline=baseline, model=settings.model_id,
        device=_device(settings), sampler=settings.sampler.name, steps=_steps(settings),
        height=g.height, width=g.width, guidance=g.guidance_scale, batch=run.batch,
        precision=precision, compile=compile_, passes=run.passes, iters=iters, warmup=warmup,
        load_seconds=run.load_seconds, first_call_seconds=run.first_call_seconds,
        unet_steps_per_s=statistics.median(run.steps_per_s) if run.steps_per_s else None,
        seconds_per_image_median=statistics.median(per_image),
        seconds_per_image_p90=_percentile(per_image, 90),
        images_per_s=len(per_image) / sum(per_image),
        peak_memory_bytes=run.peak.peak_bytes, memory_kind=run.peak.kind, nfe=run.nfe,
        compile_cache_entries=run.cache_entries, notes=run.notes,
    )


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _fidelity(images: list, reference: list) -> tuple[float, float, float, float]:
    """Mean and worst PSNR (capped) and SSIM of images against the same-seed references."""
    from sdaccel.metrics import psnr, ssim

    psnrs = [min(psnr(a, b), PSNR_CAP_DB) for a, b in zip(images, reference, strict=True)]
    ssims = [ssim(a, b) for a, b in zip(images, reference, strict=True)]
    return statistics.fmean(psnrs), statistics.fmean(ssims), min(psnrs), min(ssims)


def _compare(row: Row, reference: Row, images: list, reference_images: list, min_psnr: float,
             min_ssim: float) -> None:
    row.speedup = reference.seconds_per_image_median / row.seconds_per_image_median
    row.psnr_db, row.ssim, row.psnr_min_db, row.ssim_min = _fidelity(images, reference_images)
    row.drift = row.psnr_min_db < min_psnr or row.ssim_min < min_ssim


def _precision(settings: Settings) -> str:
    return f"{settings.unet_dtype}/{settings.vae_dtype}/{settings.text_encoder_dtype}"


def _compile_label(settings: Settings) -> str:
    c = settings.compile
    if not c.enabled:
        return "eager"
    return c.mode + ("+vae" if c.compile_vae else "")


def benchmark(
    config: ConfigSpec | Sequence[ConfigSpec],
    prompts: Sequence[str] | None = None,
    iters: int = 20,
    warmup: int = 3,
    *,
    overrides: Sequence[str] = (),
    flags: dict[str, Any] | None = None,
    baseline_dtype: str = "fp32",
    also_baselines: Sequence[str] = (),
    min_psnr: float = MIN_PSNR_DB,
    min_ssim: float = MIN_SSIM,
    on_progress: Callable[[BenchProgress], None] | None = None,
) -> BenchReport:
    """Measure each configuration beside a plain diffusers baseline in this process.

    `config`: a preset name, a YAML path (the seed's `configs/<name>.yaml` names work), a
    Settings, a (label, spec) pair, or a list of these. `prompts`: the seed's three prompts by
    default. `also_baselines` adds diffusers runs in other precisions (e.g. "fp16"), measured
    against the main baseline like any configuration. `iters` timed calls follow `warmup`
    uncounted ones; call i uses prompt
    i mod len(prompts) and seed settings.seed + i x batch. Returns a BenchReport (rows for the
    baselines and the configurations; `.to_json()`, `.write_csv()`, `.plot()`)."""
    from sdaccel import gpu_stats
    from sdaccel.engine.precision import check_precisions, resolve_device

    if iters < 1:
        raise ConfigError(f"iters must be at least 1, got {iters}")
    if warmup < 0:
        raise ConfigError(f"warmup must not be negative, got {warmup}")
    for dtype in (baseline_dtype, *also_baselines):
        if dtype not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"baseline dtype {dtype!r} is not valid; valid: fp32, fp16, bf16")
    prompts = list(prompts) if prompts else list(DEFAULT_PROMPTS)
    progress = on_progress or (lambda _p: None)
    configs = resolve_configs(config, overrides, flags)
    for c in configs:  # fail before measuring anything, naming the configuration
        try:
            device = resolve_device(c.settings.device)
            for dtype in (baseline_dtype, *also_baselines):
                check_precisions(device, {"baseline": dtype})
        except SdaccelError as exc:
            raise type(exc)(f"configuration {c.label!r}: {exc}") from None

    rows: list[Row] = []
    images: dict[str, list] = {}
    baselines: dict[tuple, str] = {}
    for c in configs:
        key = _baseline_key(c.settings, baseline_dtype)
        if key not in baselines:
            label = f"diffusers {baseline_dtype}" + (f" #{len(baselines) + 1}" if baselines
                                                      else "")
            run = _run_baseline(c.settings, baseline_dtype, label, prompts, iters, warmup,
                                progress)
            _free(_device(c.settings))  # the pipeline is gone: give its memory back
            base = _row(label, "baseline", label, c.settings, run, iters, warmup,
                        f"{baseline_dtype} (all)", "eager")
            base.speedup = 1.0
            rows.append(base)
            images[label] = run.images
            baselines[key] = label
            for dtype in also_baselines:
                other = label.replace(f"diffusers {baseline_dtype}", f"diffusers {dtype}", 1)
                run = _run_baseline(c.settings, dtype, other, prompts, iters, warmup, progress)
                _free(_device(c.settings))
                row = _row(other, "baseline", label, c.settings, run, iters, warmup,
                           f"{dtype} (all)", "eager")
                _compare(row, base, run.images, images[label], min_psnr, min_ssim)
                rows.append(row)
                images[other] = run.images
        reference_label = baselines[key]
        run = _run_engine(c, prompts, iters, warmup, progress)
        _free(_device(c.settings))
        row = _row(c.label, "config", reference_label, c.settings, run, iters, warmup,
                   _precision(c.settings), _compile_label(c.settings))
        reference = next(r for r in rows if r.label == reference_label)
        _compare(row, reference, run.images, images[reference_label], min_psnr, min_ssim)
        rows.append(row)
        images[c.label] = run.images
    for r in rows:  # a main baseline is its own reference
        if r.label == r.baseline:
            r.psnr_db, r.ssim, r.psnr_min_db, r.ssim_min = PSNR_CAP_DB, 1.0, PSNR_CAP_DB, 1.0
    import diffusers
    import torch

    device = _device(configs[0].settings)
    resettable = gpu_stats.reset_peak(device)
    note = ("CUDA peak allocated during the timed calls" if device.startswith("cuda") else
            "process peak RSS during the timed calls" if resettable else
            "process lifetime peak RSS (this platform cannot reset it)")
    return BenchReport(
        rows=rows, prompts=prompts, iters=iters, warmup=warmup,
        device_name=gpu_stats.device_name(device),
        versions={"torch": torch.__version__, "diffusers": diffusers.__version__},
        min_psnr=min_psnr, min_ssim=min_ssim, memory_note=note, images=images,
    )
