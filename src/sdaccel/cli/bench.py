"""`sdaccel bench`: presets side by side with a plain diffusers baseline run in the same process."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sdaccel.cli import options as opt
from sdaccel.cli.command import SettingsFlags, command
from sdaccel.errors import ConfigError


@command(settings="flags", presets="many",
         shorthand=("model", "steps", "sampler", "seed", "height", "width", "guidance",
                    "num_images"), engine=True)
def bench(
    console: Console,
    settings: SettingsFlags,
    iters: Annotated[int, typer.Option("--iters", help="Timed calls per configuration.")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", help="Uncounted calls before timing "
                                        "(compilation happens here).")] = 3,
    prompts_file: Annotated[Path | None, typer.Option(
        "--prompts", help="File of prompts, one per line (# comments and blank lines skipped). "
        "[default: the seed's three prompts]", show_default=False)] = None,
    baseline_dtype: Annotated[str, typer.Option(
        "--baseline-dtype", help="Precision of the diffusers baseline: fp32, or fp16/bf16 "
        "(GPU).")] = "fp32",
    also_baselines: Annotated[list[str] | None, typer.Option(
        "--also-baseline", help="Also run diffusers in this precision (e.g. fp16), measured "
        "against the main baseline; repeatable.", show_default=False)] = None,
    peers: Annotated[list[str] | None, typer.Option(
        "--peer", help="Also run a peer package on the baseline pipeline, as its own row: "
        "deepcache or tomesd, optionally with the package's own parameters "
        "(deepcache:cache_interval=5, tomesd:ratio=0.3); repeatable. Needs "
        "pip install 'sdaccel[peers]'.", show_default=False)] = None,
    equal_cost: Annotated[bool, typer.Option(
        "--equal-cost", help="For each configuration whose measured cost is below its plan, "
        "also run it with adaptive compute off at that many fixed steps (equal cost).")
    ] = False,
    min_psnr: Annotated[float, typer.Option(
        "--min-psnr", help="Flag a configuration whose worst image is below this PSNR (dB) "
        "against the baseline.")] = 30.0,
    min_ssim: Annotated[float, typer.Option(
        "--min-ssim", help="Flag a configuration whose worst image is below this SSIM.")] = 0.95,
    csv_file: Annotated[Path | None, typer.Option("--csv", help="Also write the rows as CSV.",
                                                  show_default=False)] = None,
    plot_file: Annotated[Path | None, typer.Option(
        "--plot", help="Also plot speed-up against fidelity (PNG; needs matplotlib).",
        show_default=False)] = None,
    as_json: opt.Json = False,
) -> None:
    """Measure presets: speed, memory and fidelity to a diffusers baseline run beside them.

    Every configuration is compared with a plain StableDiffusionPipeline (fp32 unless
    --baseline-dtype) of the same model, sampler, steps, size and seeds, run in this process.
    All rows are loaded and warmed up first, then timed in interleaved rounds; a speed-up is the
    median of the per-round paired ratios to the baseline, shown with their 25th-75th
    percentile. Shorthand flags and --set apply to every configuration.
    """
    specs: list = list(settings.preset or []) + list(settings.config or []) or ["tiny"]
    prompts = _read_prompts(prompts_file) if prompts_file else None
    if csv_file is not None and csv_file.suffix.lower() != ".csv":
        raise ConfigError(f"--csv {str(csv_file)!r}: expected a .csv file name")
    if plot_file is not None and plot_file.suffix.lower() != ".png":
        raise ConfigError(f"--plot {str(plot_file)!r}: expected a .png file name")
    report = _run(specs, prompts, iters, warmup, settings.overrides, settings.shorthand,
                  baseline_dtype, also_baselines or [], peers or [], equal_cost, min_psnr,
                  min_ssim, console)
    if as_json:
        typer.echo(report.to_json())
    else:
        out = Console()
        if not out.is_terminal:  # files and pipes get every column unwrapped
            out = Console(width=240)
        out.print(report_table(report))
    if csv_file is not None:
        console.print(f"[green]csv[/] {report.write_csv(csv_file)}", highlight=False)
    if plot_file is not None:
        console.print(f"[green]plot[/] {report.plot(plot_file)}", highlight=False)
    for row in report.rows:
        if row.notes:
            console.print(f"[yellow]Note:[/] {escape(row.label)}: {escape(row.notes)}",
                          highlight=False)


def _read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"--prompts {str(path)!r}: no such file")
    prompts = [line.strip() for line in path.read_text().splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"--prompts {str(path)!r}: no prompts in it (one per line)")
    return prompts


def _run(specs, prompts, iters, warmup, overrides, flags, baseline_dtype, also_baselines,
         peers, equal_cost, min_psnr, min_ssim, console: Console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from sdaccel.bench import benchmark

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        console=console, transient=True, disable=not console.is_terminal)
    tasks: dict[tuple[str, str], int] = {}

    def on_progress(p) -> None:
        key = (p.label, p.phase)
        if key not in tasks:
            if not console.is_terminal and p.phase != "warm-up":
                console.print(f"[dim]{escape(p.label)}: {p.phase}[/]", highlight=False)
            tasks[key] = progress.add_task(f"{escape(p.label)} {p.phase}", total=p.total)
        progress.update(tasks[key], completed=p.done, total=p.total)

    with progress:
        return benchmark(specs, prompts, iters, warmup, overrides=overrides, flags=flags,
                         baseline_dtype=baseline_dtype, also_baselines=also_baselines,
                         peers=peers, equal_cost=equal_cost, min_psnr=min_psnr,
                         min_ssim=min_ssim, on_progress=on_progress)


def _num(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _speedup(r) -> str:
    if not r.speedup:
        return "-"
    if r.speedup_p25 is None or r.speedup_p75 is None or r.label == r.baseline:
        return f"{r.speedup:.2f}x"
    return f"{r.speedup:.2f}x ({r.speedup_p25:.2f}-{r.speedup_p75:.2f})"


_FLAGS = {"baseline": "baseline", "peer": "peer", "equal-cost": "equal cost", "config": ""}


def report_table(report) -> Table:
    """The report as one Rich table: baselines dimmed, drifting rows flagged."""
    from sdaccel.bench import PSNR_CAP_DB, SPREAD_PERCENTILES

    # Equal-cost rows differ from their configuration by their steps alone, which their label
    # says: they do not break a shared run description.
    runs = {f"{r.model} / {r.sampler} {r.steps} steps / {r.height}x{r.width} / guidance "
            f"{r.guidance:g} / batch {r.batch}" for r in report.rows if r.kind != "equal-cost"}
    shared = next(iter(runs)) if len(runs) == 1 else None
    low, high = SPREAD_PERCENTILES
    table = Table(title=f"sdaccel bench on {escape(report.device_name)}: {report.iters} timed "
                  f"rounds (every row once per round, interleaved) after {report.warmup} "
                  f"warm-up call(s), {len(report.prompts)} prompt(s)"
                  + (f"\n{escape(shared)}" if shared else ""),
                  caption=f"speed-up: median over rounds of the baseline's s/img / the row's "
                  f"s/img in the same round (p{low}-p{high} of those ratios); cost: UNet work "
                  "per image in full guided UNet calls; memory: "
                  f"{report.memory_note}; PSNR/SSIM: against the baseline's image of the same "
                  f"prompt and seed; DRIFT: worst image below {report.min_psnr:g} dB or SSIM "
                  f"{report.min_ssim:g}",
                  title_justify="left", caption_justify="left")
    columns = [("configuration", "left")] + ([] if shared else [("run", "left")]) + [
        ("precision u/v/t", "left"), ("compile, passes", "left"), ("first call s", "right"),
        ("UNet steps/s", "right"), ("s/img p50", "right"), ("p90", "right"),
        ("img/s", "right"), ("peak MiB", "right"), ("NFE", "right"), ("cost", "right"),
        (f"speed-up (p{low}-p{high})", "right"), ("PSNR dB", "right"), ("SSIM", "right"),
        ("", "left")]
    for name, justify in columns:
        table.add_column(name, justify=justify)
    for r in report.rows:
        psnr = "∞" if r.psnr_db is not None and r.psnr_db >= PSNR_CAP_DB else _num(r.psnr_db, 1)
        flag = "[bold red]DRIFT[/]" if r.drift else _FLAGS.get(r.kind, "")
        if r.drift and r.kind in ("peer", "equal-cost"):
            flag += f" {_FLAGS[r.kind]}"
        if r.compile_cache_entries:
            flag += " cache"
        run = [] if shared else [escape(f"{r.model} / {r.sampler} {r.steps} / "
                                        f"{r.height}x{r.width}")]
        table.add_row(
            escape(r.label), *run, r.precision,
            escape(r.compile + (f", {r.passes}" if r.passes else "")),
            _num(r.first_call_seconds), _num(r.unet_steps_per_s, 1),
            _num(r.seconds_per_image_median, 3), _num(r.seconds_per_image_p90, 3),
            _num(r.images_per_s), f"{r.peak_memory_bytes / 2**20:.0f}", _num(r.nfe, 0),
            _num(r.cost, 2), _speedup(r), psnr, _num(r.ssim, 4), flag.strip(),
            style="dim" if r.kind == "baseline" else None,
        )
    return table
