"""`sdaccel generate`: prompts in, PNG files with their settings in metadata out."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from sdaccel.cli import options as opt
from sdaccel.cli.command import EXIT_INTERRUPTED, command
from sdaccel.errors import ConfigError

if TYPE_CHECKING:
    from sdaccel.settings import ResolvedSettings


@command(engine=True)
def generate(
    console: Console,
    settings: ResolvedSettings,
    prompts: Annotated[list[str] | None, typer.Argument(
        help="One or more prompts (or --prompts-file).", show_default=False)] = None,
    prompts_file: Annotated[Path | None, typer.Option(
        "--prompts-file", "-f", help="Batch mode: one prompt per line, or JSON objects with "
        "per-line prompt, negative_prompt, seed, height, width, guidance_scale, loras. "
        "Resumable; splits the jobs across processes under accelerate launch / torchrun.",
        show_default=False)] = None,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt", help="Negative prompt "
                                                 "for every image (--prompts-file: for every "
                                                 "line without its own).")] = "",
    as_json: opt.Json = False,
) -> None:
    """Generate images: files img_{index:03d}_steps{steps}.png in io.out_dir, never overwriting.

    Each prompt is one batch of num_images_per_prompt images; image k of the run uses seed + k.
    With --prompts-file, job i's images are i*n .. i*n+n-1 (n = num_images_per_prompt) whatever
    the number of processes, each listed in io.out_dir/manifest.jsonl; re-running the same
    command makes only what is missing.
    """
    if (prompts_file is None) == (not prompts):
        raise ConfigError("give prompts as arguments or --prompts-file FILE, not both"
                          if prompts else "no prompts: give them as arguments or "
                          "--prompts-file FILE")
    if prompts_file is not None:
        _run_jobs(settings, prompts_file, negative_prompt, as_json, console)
    else:
        _run(settings, prompts, negative_prompt, as_json, console)


def _describe(resolved) -> str:
    settings = resolved.settings
    a = settings.adaptive
    if not a.enabled:
        steps = f"{settings.sampler.steps} steps"
    elif a.mode == "replan":
        steps = (f"adaptive {a.min_steps}-{a.max_steps} steps (warm-up {a.warmup_steps}, "
                 f"{a.uncertainty.method})")
    else:
        steps = f"{settings.sampler.steps} steps, adaptive compute per step"
    return (f"[dim]preset {escape(str(resolved.preset))}, model {escape(settings.model_id)}, "
            f"{settings.sampler.name} {steps}, {settings.device}[/]")


def _run(resolved, prompts: list[str], negative_prompt: str, as_json: bool,
         console: Console) -> None:
    from sdaccel import runs
    from sdaccel.cli.render import ProgressRenderer
    from sdaccel.outputs import RunWriter

    settings = resolved.settings
    renderer = ProgressRenderer(console)
    console.print(_describe(resolved), highlight=False)
    engine, _ = runs.start_engine(settings, renderer)
    writer = RunWriter(settings, engine.components.name, engine.components.model_hash)
    try:
        jobs = runs.prompt_jobs(prompts, settings, negative_prompt)
        for job, _index, result in runs.images(engine, jobs):
            record = writer.save(result)  # the next free file name: a plain run never overwrites
            renderer.image_saved(record, job.prompt)
            if as_json:
                typer.echo(json.dumps(record))
    finally:
        renderer.close()
        grid = writer.finish()
        if grid is not None:
            console.print(f"[green]grid[/] {grid}", highlight=False)
        renderer.summary(writer.records)
        if writer.records:
            console.print(f"{len(writer.records)} image(s) in {settings.io.out_dir}",
                          highlight=False)


def _run_jobs(resolved, prompts_file: Path, negative_prompt: str, as_json: bool,
              console: Console) -> None:
    """--prompts-file: this process's share of the jobs; the main process draws the progress
    of all of them (read from the per-process manifests) and merges the manifests."""
    from sdaccel import jobs
    from sdaccel.cli.render import JobsProgress, ProgressRenderer
    from sdaccel.events import ignore

    job_list = jobs.read_jobs(prompts_file, resolved.settings, negative_prompt)
    state, settings = jobs.process_settings(resolved.settings)
    main = state.is_main_process
    if main:
        console.print(_describe(resolved) + f"[dim], {len(job_list)} jobs from {prompts_file}, "
                      f"{state.num_processes} process(es)[/]", highlight=False)
        if settings.io.save_grid:
            console.print("[yellow]Warning:[/] io.save_grid: no grid with --prompts-file",
                          highlight=False)
    # Notices go through a plain renderer until the progress display exists.
    notices = ProgressRenderer(console) if main else ignore
    engine, writer = jobs.start(settings, job_list, prompts_file, lambda event: notices(event))
    out_dir = writer.out_dir
    follower = jobs.ManifestFollower(out_dir)
    stop = threading.Event()
    progress: JobsProgress | None = None

    def show_new() -> None:
        for record in follower.poll():
            progress.image_saved(record, out_dir)
            if as_json:
                typer.echo(json.dumps(record))

    def follow() -> None:
        while not stop.wait(0.5):
            show_new()

    thread = threading.Thread(target=follow, name="sdaccel-progress", daemon=True)

    def on_ready(plan) -> None:
        nonlocal progress, notices
        done = len(plan.done)
        if done:
            left = plan.pending_images
            console.print(f"{done} of {plan.total_images} image(s) already in {out_dir}; "
                          + (f"making the other {left}" if left else "nothing to make"),
                          highlight=False)
        progress = notices = JobsProgress(console, plan.total_images, done, state.num_processes)
        thread.start()

    def on_finished() -> None:
        stop.set()
        thread.join()
        show_new()

    try:
        report = jobs.run_jobs(engine, writer, job_list, state, prompts_file,
                               on_ready=on_ready, on_finished=on_finished)
    except KeyboardInterrupt:
        if not main:  # the main process says it, once
            raise typer.Exit(EXIT_INTERRUPTED) from None
        raise
    finally:
        stop.set()
        if progress is not None:
            progress.close()
    if main:
        progress.close()
        ProgressRenderer(console).summary(progress.records)
        made = sum(1 for record in report.records if record["index"] < report.total_images)
        console.print(f"{made} of {report.total_images} image(s) in {out_dir}, "
                      f"listed in {out_dir / jobs.MANIFEST}", highlight=False)
