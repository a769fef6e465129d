"""`benchmark(...)`: load every row, warm each up, then time them interleaved in rounds.

1. **Load** every row first, in table order: per group of configurations that share model,
   sampler, plan, size, guidance, batch and seed, a diffusers baseline (plus `also_baselines`
   and one row per peer), then the configurations.
2. **Warm up** each row in turn (`warmup` uncounted calls: compilation happens here).
3. **Cost**: peers' UNet FLOPs and their baseline's are counted over one more call each;
   with `equal_cost`, each configuration whose mean warm-up cost is below its plan gets a row of
   the same settings with adaptive compute off and `sampler.steps` = that cost (rounded), loaded
   and warmed up now.
4. **Timed rounds**: round r calls every row once, in table order, all with the prompt and seed
   of call `warmup + r`. A row's speed-up is the median over rounds of the paired ratio
   (its baseline's s/img in round r) / (its s/img in round r): both calls of a ratio ran back to
   back, so a slow spell of a shared machine hits both and cancels.
5. **Compare**: with `reference` naming a configuration, that row is every row's baseline
   (e.g. a few-step preset against the `cpu` preset, both ours); else each row's baseline is
   its group's diffusers pipeline. A row whose recipe (model, seed, sampler, steps, guidance,
   LoRAs, decoder...) differs from its baseline's makes another picture by design: it says what
   differs and is not judged for drift (`fidelity.py`). Rows of the bundled model get the
   judge's caption alignment, baselines included.

Memory cannot be read per row from a process peak once every row is resident, so each row gets
its own footprint: its weights (on CUDA: what loading it allocated; on the CPU: the bytes of its
models' parameters and buffers), plus the largest rise above resident memory during any one of
its own calls (the peak is reset before each call).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from sdaccel.bench.configs import (
    BenchConfig,
    ConfigSpec,
    baseline_key,
    device_of,
    fixed_steps,
    resolve_configs,
)
from sdaccel.bench.contestants import Contestant, load_engine, load_pipeline
from sdaccel.bench.fidelity import caption_alignment, default_prompts, differences, uses_captions
from sdaccel.bench.peers import PeerSpec, package_version, parse_peers
from sdaccel.bench.report import (
    DEFAULT_PROMPTS,
    MIN_PSNR_DB,
    MIN_SSIM,
    PSNR_CAP_DB,
    BenchProgress,
    BenchReport,
    Row,
    paired_speedup,
    percentile,
)
from sdaccel.errors import ConfigError, SdaccelError

# The clock of the timed calls (tests replace it with a scripted one).
clock = time.perf_counter


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
    peers: Sequence[str | PeerSpec] = (),
    equal_cost: bool = False,
    min_psnr: float = MIN_PSNR_DB,
    min_ssim: float = MIN_SSIM,
    on_progress: Callable[[BenchProgress], None] | None = None,
    reference: str | None = None,
    baselines: bool = True,
) -> BenchReport:
    """Measure each configuration beside a plain diffusers baseline in this process.

    `config`: a preset name, a YAML path (the seed's `configs/<name>.yaml` names work), a
    Settings, a (label, spec) pair, or a list of these. `prompts`: the seed's three prompts by
    default (held-out shape captions where a row runs bundled:shapes). `iters` timed rounds
    follow `warmup` uncounted calls per row; call i uses prompt i mod len(prompts) and seed
    settings.seed + i x batch, round r is call warmup + r for every row. `also_baselines`
    adds diffusers runs in other precisions (e.g. "fp16"); `peers` adds rows for peer packages
    applied to the baseline pipeline ("deepcache", "tomesd", with parameters as
    "deepcache:cache_interval=5"; see `sdaccel.bench.peers`); `equal_cost` adds, for each
    configuration that costs less than its plan, the same configuration at fixed steps of equal
    cost. Every row is compared with its group's main baseline, or with the configuration
    labelled `reference` when given (speed-up paired in the same rounds, PSNR, whether it is
    meant to be the same image); `baselines=False` (with a reference only) runs no diffusers
    rows. Returns a BenchReport (`.rows`, `.to_json()`, `.write_csv()`, `.plot()`)."""
    _check_counts(iters, warmup, (baseline_dtype, *also_baselines))
    progress = on_progress or (lambda _p: None)
    peer_specs = parse_peers(peers)
    configs = resolve_configs(config, overrides, flags)
    _check_reference(reference, baselines, configs, also_baselines, peer_specs)
    prompts = list(prompts or default_prompts([c.settings.model_id for c in configs],
                                              warmup + iters) or DEFAULT_PROMPTS)
    _check_devices(configs, (baseline_dtype, *also_baselines))

    calls = warmup + iters
    _import_libraries()
    field = _load_field(configs, prompts, calls, baseline_dtype, also_baselines, peer_specs,
                        progress, baselines)
    for c in field:
        _warm_up(c, warmup, progress)
    _count_flops(field, progress)
    if equal_cost:
        field = _with_equal_cost_rows(field, prompts, calls, warmup, progress)
    for c in field if reference else ():  # costs are counted: now every row answers to it
        c.baseline = reference

    gc.collect()
    for r in range(iters):
        for c in field:
            _timed_call(c, warmup + r)
            progress(BenchProgress(c.label, "timed", r + 1, iters))

    rows = _rows(field, iters, warmup, min_psnr, min_ssim)
    images = {c.label: c.images for c in field}
    device = device_of(configs[0].settings)
    del field  # every loaded model goes with it
    return _report(rows, images, prompts, iters, warmup, device, peer_specs, min_psnr,
                   min_ssim, reference)


def _check_counts(iters: int, warmup: int, baseline_dtypes: Sequence[str]) -> None:
    if iters < 1:
        raise ConfigError(f"iters must be at least 1, got {iters}")
    if warmup < 0:
        raise ConfigError(f"warmup must not be negative, got {warmup}")
    for dtype in baseline_dtypes:
        if dtype not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"baseline dtype {dtype!r} is not valid; valid: fp32, fp16, bf16")


def _check_devices(configs: list[BenchConfig], baseline_dtypes: Sequence[str]) -> None:
    """Fail before measuring anything, naming the configuration."""
    from sdaccel.engine.loading.precision import check_precisions, resolve_device

    for c in configs:
        try:
            device = resolve_device(c.settings.device)
            for dtype in baseline_dtypes:
                check_precisions(device, {"baseline": dtype})
        except SdaccelError as exc:
            raise type(exc)(f"configuration {c.label!r}: {exc}") from None


def _rows(field: list[Contestant], iters: int, warmup: int, min_psnr: float,
          min_ssim: float) -> list[Row]:
    """Each contestant's row, compared with its baseline (or the reference)."""
    rows = [_row(c, iters, warmup) for c in field]
    by_label = {c.label: c for c in field}
    for row, c in zip(rows, field, strict=True):
        if row.label == row.baseline:  # a main baseline (or the reference) is its own
            row.speedup = row.speedup_p25 = row.speedup_p75 = 1.0
            row.psnr_db, row.ssim, row.psnr_min_db, row.ssim_min = (PSNR_CAP_DB, 1.0,
                                                                    PSNR_CAP_DB, 1.0)
        else:
            _compare(row, c, by_label[row.baseline], min_psnr, min_ssim)
        if uses_captions(c.settings.model_id):
            row.alignment = caption_alignment(c.images, _captions(c, iters, warmup))
    return rows


def _report(rows: list[Row], images: dict, prompts: list[str], iters: int, warmup: int,
            device, peer_specs: list[PeerSpec], min_psnr: float, min_ssim: float,
            reference: str | None) -> BenchReport:
    """The report, with the versions and the device's memory note (the models freed first)."""
    import diffusers
    import torch

    from sdaccel import gpu_stats

    resettable = gpu_stats.reset_peak(device)
    _free(device)
    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    versions.update({s.peer.package: package_version(s.peer.package) for s in peer_specs})
    return BenchReport(
        rows=rows, prompts=prompts, iters=iters, warmup=warmup,
        device_name=gpu_stats.device_name(device), versions=versions,
        min_psnr=min_psnr, min_ssim=min_ssim, memory_note=_memory_note(device, resettable),
        reference=reference, images=images,
    )


def _check_reference(reference: str | None, baselines: bool, configs: list[BenchConfig],
                     also_baselines: Sequence[str], peer_specs: list[PeerSpec]) -> None:
    """Before anything loads: the reference names a configuration, and a run without diffusers
    baselines has a reference and nothing that needs the baseline pipeline."""
    labels = [c.label for c in configs]
    if reference is not None and reference not in labels:
        raise ConfigError(f"reference {reference!r} is not a configuration of this run; valid: "
                          f"{', '.join(labels)}")
    if baselines:
        return
    if reference is None:
        raise ConfigError("baselines off needs a reference configuration to compare the rows "
                          f"with (reference=LABEL, --reference LABEL); valid: {', '.join(labels)}")
    if also_baselines or peer_specs:
        raise ConfigError("baselines off leaves no diffusers pipeline for also_baselines or "
                          "peers (--also-baseline, --peer) to run on: keep the baselines")


# --------------------------------------------------------------------------- the field


def _load_field(configs: list[BenchConfig], prompts, calls, baseline_dtype, also_baselines,
                peer_specs: list[PeerSpec], progress, baselines: bool = True
                ) -> list[Contestant]:
    """Every row, loaded, in table order: each group's baselines and peers before its first
    configuration (without baselines: the configurations alone)."""
    field: list[Contestant] = []
    groups: dict[tuple, str] = {}
    for config in configs:
        settings = config.settings
        key = baseline_key(settings, baseline_dtype) if baselines else ()
        if baselines and key not in groups:
            suffix = f" #{len(groups) + 1}" if groups else ""
            main = f"diffusers {baseline_dtype}{suffix}"
            groups[key] = main
            field.append(_load(main, "baseline", main, progress, lambda s=settings: load_pipeline(
                s, baseline_dtype, prompts, calls)))
            for dtype in also_baselines:
                field.append(_load(f"diffusers {dtype}{suffix}", "baseline", main, progress,
                                   lambda s=settings, d=dtype: load_pipeline(s, d, prompts,
                                                                             calls)))
            for spec in peer_specs:
                field.append(_load(f"{spec.label}{suffix}", "peer", main, progress,
                                   lambda s=settings, p=spec: load_pipeline(
                                       s, baseline_dtype, prompts, calls, peer=p)))
        field.append(_load(config.label, "config", groups.get(key, ""), progress,
                           lambda c=config: load_engine(c, prompts, calls)))
    return field


def _load(label: str, kind: str, baseline: str, progress, loader: Callable[[], Contestant]
          ) -> Contestant:
    from sdaccel.bench.contestants import weight_bytes

    progress(BenchProgress(label, "load", 0, 1))
    gc.collect()
    before = _resident("cuda")
    started = time.perf_counter()
    contestant = loader()
    contestant.load_seconds = time.perf_counter() - started
    gc.collect()
    if contestant.device.startswith("cuda"):  # exact: what loading it allocated
        contestant.load_bytes = max(0, _resident(contestant.device) - before)
    else:  # RSS barely moves where the allocator reuses freed memory: count the weights
        contestant.load_bytes = weight_bytes(contestant.modules)
    contestant.label, contestant.kind, contestant.baseline = label, kind, baseline
    progress(BenchProgress(label, "load", 1, 1))
    return contestant


def _warm_up(c: Contestant, warmup: int, progress) -> None:
    for index in range(warmup):
        _, _, _, costs = _measured_call(c, index)
        if costs is not None:
            c.warmup_costs.extend(costs)
        progress(BenchProgress(c.label, "warm-up", index + 1, warmup))


def _count_flops(field: list[Contestant], progress) -> None:
    """Peer rows' cost: the UNet FLOPs of one call / those of the baseline's call of the same
    prompt and seed x the baseline's steps (one full guided UNet call = 1.0 per image)."""
    from sdaccel.bench.flops import unet_flops

    by_label = {c.label: c for c in field}
    for peer in (c for c in field if c.kind == "peer"):
        base = by_label[peer.baseline]
        if peer.peer.peer.same_work:  # the baseline's UNet work, run outside torch
            peer.flops_cost = float(base.steps)
            continue
        for c in (base, peer):
            if c.unet_flops is None:
                progress(BenchProgress(c.label, "cost", 0, 1))
                try:
                    c.unet_flops = unet_flops(c.unet, lambda c=c: c.call(*c.plan[0]))
                except LookupError as exc:
                    c.notes.append(f"cost not measured: {exc}")
                    c.unet_flops = 0
                progress(BenchProgress(c.label, "cost", 1, 1))
        if base.unet_flops and peer.unet_flops:
            peer.flops_cost = base.steps * peer.unet_flops / base.unet_flops


def _with_equal_cost_rows(field: list[Contestant], prompts, calls, warmup, progress
                          ) -> list[Contestant]:
    """After each configuration whose mean cost (over its warm-up calls, or one probe call
    without warm-up) rounds below its plan: the same settings, adaptive compute off, that many
    fixed steps. Loaded and warmed up here; timed with the others."""
    out: list[Contestant] = []
    for c in field:
        out.append(c)
        if c.kind != "config":
            continue
        if not c.warmup_costs:
            progress(BenchProgress(c.label, "cost", 0, 1))
            _, _, _, costs = _measured_call(c, 0)  # a probe call, prompt and seed of call 0
            progress(BenchProgress(c.label, "cost", 1, 1))
            c.warmup_costs.extend(costs or [])
        if not c.warmup_costs:
            c.notes.append("equal-cost row not made: the engine reports no cost")
            continue
        mean = statistics.fmean(c.warmup_costs)
        steps = max(1, math.floor(mean + 0.5))
        if steps >= c.steps:
            continue
        label = f"{c.label} fixed {steps}"
        config = BenchConfig(label, fixed_steps(c.settings, steps))
        row = _load(label, "equal-cost", c.baseline, progress,
                    lambda config=config: load_engine(config, prompts, calls))
        row.equal_cost_of = c.label
        row.recipe = c.recipe  # it stands in for the configuration's full plan: that image
        _warm_up(row, warmup, progress)
        out.append(row)
    return out


# --------------------------------------------------------------------------- calls


def _import_libraries() -> None:
    """Import what every row needs before the first load is measured, so that the first row's
    load time and memory are its own and not the libraries'."""
    from diffusers import StableDiffusionPipeline  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    from sdaccel.engine.engine import Engine  # noqa: F401
    from sdaccel.engine.loading.models import load_components  # noqa: F401


def _resident(device: str) -> int:
    """Memory in use now: CUDA allocated bytes, or the process' resident set."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.memory_allocated(torch.device(device)) if \
            torch.cuda.is_available() else 0
    from sdaccel.gpu_stats import current_rss_bytes

    return current_rss_bytes() or 0


def _measured_call(c: Contestant, index: int):
    """Call `index` of the row's plan: (seconds, images, step marks, costs); keeps its first
    call's time and the largest rise of peak memory above what was resident before a call."""
    from sdaccel import gpu_stats

    prompt, seed = c.plan[index]
    before = _resident(c.device)
    gpu_stats.reset_peak(c.device)
    started = clock()
    images, marks, costs = c.call(prompt, seed)
    gpu_stats.synchronize(c.device)
    elapsed = clock() - started
    reading = gpu_stats.peak(c.device)
    c.memory_kind = reading.kind
    c.working_bytes = max(c.working_bytes, reading.peak_bytes - before)
    if c.first_call_seconds is None:
        c.first_call_seconds = elapsed
    return elapsed, images, marks, costs


def _timed_call(c: Contestant, index: int) -> None:
    elapsed, images, marks, costs = _measured_call(c, index)
    c.seconds.append(elapsed)
    if len(marks) >= 2 and marks[-1] > marks[0]:
        c.rates.append((len(marks) - 1) / (marks[-1] - marks[0]))
    c.images.extend(images)
    if costs is not None:
        c.costs.extend(costs)


# --------------------------------------------------------------------------- rows


def _row(c: Contestant, iters: int, warmup: int) -> Row:
    g = c.settings.generation
    per_image = [s / c.batch for s in c.seconds]
    if c.kind == "baseline":
        cost = float(c.steps)
    elif c.kind == "peer":
        cost = c.flops_cost
    else:
        cost = statistics.fmean(c.costs) if c.costs else None
    if c.kind == "equal-cost" and cost is not None and abs(cost - c.steps) > 1e-6:
        c.notes.append(f"cost {cost:.2f} is below its {c.steps} fixed steps: a setting outside "
                       "`adaptive` still saves UNet work")
    return Row(
        label=c.label, kind=c.kind, baseline=c.baseline, model=c.settings.model_id,
        device=c.device, sampler=c.settings.sampler.name, steps=c.steps, height=g.height,
        width=g.width, guidance=g.guidance_scale, batch=c.batch, precision=c.precision,
        compile=c.compile, passes=c.passes, iters=iters, warmup=warmup,
        load_seconds=c.load_seconds, first_call_seconds=c.first_call_seconds or 0.0,
        unet_steps_per_s=statistics.median(c.rates) if c.rates else None,
        seconds_per_image_median=statistics.median(per_image),
        seconds_per_image_p90=percentile(per_image, 90),
        images_per_s=len(per_image) / sum(per_image),
        peak_memory_bytes=c.load_bytes + max(0, c.working_bytes),
        memory_kind=c.memory_kind, load_memory_bytes=c.load_bytes,
        nfe=statistics.fmean(c.nfes) if c.nfes else c.nfe,
        cost=cost, cost_source=c.cost_source if cost is not None else "",
        compile_cache_entries=c.cache_entries, equal_cost_of=c.equal_cost_of,
        notes="; ".join(c.notes), warnings=list(c.warnings),
    )


def _fidelity(images: list, reference: list) -> tuple[float, float, float, float]:
    """Mean and worst PSNR (capped) and SSIM of images against the same-seed references."""
    from sdaccel.metrics import psnr, ssim

    psnrs = [min(psnr(a, b), PSNR_CAP_DB) for a, b in zip(images, reference, strict=True)]
    ssims = [ssim(a, b) for a, b in zip(images, reference, strict=True)]
    return statistics.fmean(psnrs), statistics.fmean(ssims), min(psnrs), min(ssims)


def _compare(row: Row, c: Contestant, base: Contestant, min_psnr: float,
             min_ssim: float) -> None:
    """Speed-up paired by round; PSNR/SSIM where the images can be set side by side; drift only
    where the row is meant to make the same picture as `base`."""
    row.speedup, row.speedup_p25, row.speedup_p75 = paired_speedup(
        [s / base.batch for s in base.seconds], [s / c.batch for s in c.seconds])
    differ = differences(c.recipe, base.recipe)
    row.same_image = not differ
    row.compared_with = "different image: " + "; ".join(differ) if differ else "same image"
    if not _side_by_side(c.images, base.images):  # another size or batch: no pixel pairs
        return
    row.psnr_db, row.ssim, row.psnr_min_db, row.ssim_min = _fidelity(c.images, base.images)
    row.drift = row.same_image and (row.psnr_min_db < min_psnr or row.ssim_min < min_ssim)


def _side_by_side(images: list, reference: list) -> bool:
    return len(images) == len(reference) and all(
        a.size == b.size for a, b in zip(images, reference, strict=True))


def _captions(c: Contestant, iters: int, warmup: int) -> list[str]:
    """The prompt of each of the row's timed images, in order (round r: call warmup + r)."""
    return [c.plan[warmup + r][0] for r in range(iters) for _ in range(c.batch)]


def _memory_note(device: str, resettable: bool) -> str:
    if device.startswith("cuda"):
        return ("each row's own footprint: CUDA memory allocated by loading it + the largest "
                "rise of peak allocated memory above what was allocated before one of its calls")
    if resettable:
        return ("each row's own footprint: the bytes of its models' weights + the largest rise "
                "of the process' peak RSS above its RSS before one of its calls (a lower bound: "
                "memory the allocator kept from earlier calls is reused without raising RSS)")
    return ("the bytes of each row's models' weights + its calls' rise of the process' lifetime "
            "peak RSS (this platform cannot reset the peak: the call part is unreliable)")


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
