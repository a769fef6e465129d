"""`sdaccel bench`: presets side by side with a plain diffusers baseline run in the same process."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from sdaccel.cli import options as opt
from sdaccel.cli.command import SettingsFlags, command, stdout_console
from sdaccel.errors import ConfigError


@command(settings="flags", presets="many", exclude=opt.NO_IMAGES, engine=True)
def bench(
    console: Console,
    settings: SettingsFlags,
    iters: Annotated[int, typer.Option("--iters", help="Timed calls per configuration.")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", help="Uncounted calls before timing "
                                        "(compilation happens here).")] = 3,
    prompts_file: Annotated[Path | None, typer.Option(
        "--prompts", help="File of prompts, one per line (# comments and blank lines skipped). "
        "\\[default: the seed's three prompts; held-out shape captions where a configuration "
        "runs bundled:shapes]", show_default=False)] = None,
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
        "pip install 'sdaccel\\[peers]'.", show_default=False)] = None,
    equal_cost: Annotated[bool, typer.Option(
        "--equal-cost", help="For each configuration whose measured cost is below its plan, "
        "also run it with adaptive compute off at that many fixed steps (equal cost).")
    ] = False,
    reference: Annotated[str | None, typer.Option(
        "--reference", help="Compare every row with this configuration (its label: a preset "
        "name, a YAML file's stem) instead of its diffusers baseline: speed-up paired in the "
        "same rounds, PSNR, and what differs where it makes another image by design (e.g. "
        "-p cpu -p cpu-fast --reference cpu).", show_default=False)] = None,
    no_baselines: Annotated[bool, typer.Option(
        "--no-baselines", help="With --reference: run no diffusers baseline rows (a long run "
        "on the CPU is mostly theirs).")] = False,
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
    --baseline-dtype) of the same model, sampler, steps, size, LoRAs and seeds, run in this
    process, or with the configuration --reference names. A row meant to make another image
    (other sampler, steps, guidance, LoRAs, decoder) says so and is not flagged DRIFT; rows of
    bundled:shapes show the judge's caption alignment.
    All rows are loaded and warmed up first, then timed in interleaved rounds; a speed-up is the
    median of the per-round paired ratios to the baseline, shown with their 25th-75th
    percentile. Shorthand flags and --set apply to every configuration.
    """
    specs: list = list(settings.preset or []) + list(settings.config or []) or ["tiny"]
    prompts = _read_prompts(prompts_file) if prompts_file else None
    for flag, path, suffix in (("--csv", csv_file, ".csv"), ("--plot", plot_file, ".png")):
        if path is not None:
            _check_writable(flag, path, suffix)
    report = _run(specs, prompts, iters, warmup, settings.overrides, settings.shorthand,
                  baseline_dtype, also_baselines or [], peers or [], equal_cost, min_psnr,
                  min_ssim, console, reference=reference, baselines=not no_baselines)
    if as_json:
        typer.echo(report.to_json())
    else:
        stdout_console().print(report.table())
    if csv_file is not None:
        console.print(f"[green]csv[/] {report.write_csv(csv_file)}", highlight=False)
    if plot_file is not None:
        console.print(f"[green]plot[/] {report.plot(plot_file)}", highlight=False)
    for message, labels in report.warnings().items():  # once per run, not once per row
        console.print(f"[yellow]Warning:[/] {escape(', '.join(labels))}: {escape(message)}",
                      highlight=False)
    for row in report.rows:
        if row.notes:
            console.print(f"[yellow]Note:[/] {escape(row.label)}: {escape(row.notes)}",
                          highlight=False)


def _check_writable(flag: str, path: Path, suffix: str) -> None:
    """Before the long run: a report file that could not be written is a settings error."""
    import os

    if path.suffix.lower() != suffix:
        raise ConfigError(f"{flag} {str(path)!r}: expected a {suffix} file name")
    folder = next(p for p in path.absolute().parents if p.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ConfigError(f"{flag} {str(path)!r}: cannot write there ({folder} is "
                          f"{'not a folder' if not folder.is_dir() else 'not writable'})")


def _read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"--prompts {str(path)!r}: no such file")
    prompts = [line.strip() for line in path.read_text().splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"--prompts {str(path)!r}: no prompts in it (one per line)")
    return prompts


def _run(specs, prompts, iters, warmup, overrides, flags, baseline_dtype, also_baselines,
         peers, equal_cost, min_psnr, min_ssim, console: Console, **comparison):
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
                         min_ssim=min_ssim, on_progress=on_progress, **comparison)
