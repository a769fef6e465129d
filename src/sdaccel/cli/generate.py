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
        "per-line prompt, negative_prompt, seed, height, width, guidance_scale, loras, "
        "init_image, mask, strength, mask_blur, hires. Resumable; splits the jobs across "
        "processes under accelerate launch / torchrun.", show_default=False)] = None,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt", help="Negative prompt "
                                                 "for every image (--prompts-file: for every "
                                                 "line without its own).")] = "",
    init_images: Annotated[list[Path] | None, typer.Option(
        "--init-image", help="Image to image: start from this image (resized to the "
        "settings' size) at --strength; repeatable. One image serves every prompt; several "
        "images with one prompt make one job per image; as many prompts as images pair "
        "them in order.", show_default=False)] = None,
    masks: Annotated[list[Path] | None, typer.Option(
        "--mask", help="Inpainting: white is drawn again, black kept (resized to the "
        "settings' size, as the init image). One mask for every init image, or one per "
        "--init-image, in order.", show_default=False)] = None,
    mask_blur: Annotated[int | None, typer.Option(
        "--mask-blur", help="Gaussian blur radius of the mask, in pixels, 0 to 64 "
        "(--prompts-file: for every line with a mask and without its own).  \\[default: 4]",
        show_default=False)] = None,
    as_json: opt.Json = False,
) -> None:
    """Generate images: files img_{index:03d}_steps{steps}.png in io.out_dir, never overwriting.

    Each prompt is one batch of num_images_per_prompt images; image k of the run uses seed + k.
    With --prompts-file, job i's images are i*n .. i*n+n-1 (n = num_images_per_prompt) whatever
    the number of processes, each listed in io.out_dir/manifest.jsonl; re-running the same
    command makes only what is missing. With --init-image, image to image (with --mask,
    inpainting); with --hires, the hires fix.
    """
    from sdaccel.runs import DEFAULT_MASK_BLUR, MAX_MASK_BLUR

    if (prompts_file is None) == (not prompts):
        raise ConfigError("give prompts as arguments or --prompts-file FILE, not both"
                          if prompts else "no prompts: give them as arguments or "
                          "--prompts-file FILE")
    if mask_blur is not None and not 0 <= mask_blur <= MAX_MASK_BLUR:
        raise ConfigError(f"--mask-blur: must be from 0 to {MAX_MASK_BLUR} (got {mask_blur})")
    blur = DEFAULT_MASK_BLUR if mask_blur is None else mask_blur
    if prompts_file is not None:
        if init_images or masks:
            raise ConfigError("--init-image and --mask do not apply with --prompts-file: give "
                              "each line its own init_image and mask")
        _run_jobs(settings, prompts_file, negative_prompt, blur, as_json, console)
    else:
        if mask_blur is not None and not masks:
            raise ConfigError("--mask-blur: only with --mask")
        jobs = start_jobs(settings.settings, prompts, negative_prompt, init_images or [],
                          masks or [], blur)
        _run(settings, jobs, as_json, console)


def start_jobs(settings, prompts: list[str], negative_prompt: str, init_images: list[Path],
               masks: list[Path], mask_blur: int) -> list:
    """The plain run's jobs (runs.Job), prompts paired with init images and masks (each file
    read and checked once, before any model loads)."""
    from sdaccel import runs

    if masks and not init_images:
        raise ConfigError("--mask needs --init-image (the image the mask is drawn on)")
    if not init_images:
        return runs.prompt_jobs(prompts, settings, negative_prompt)
    n = len(init_images)
    if n > 1 and len(prompts) == 1:
        prompts = prompts * n  # one job per image
    elif n not in (1, len(prompts)):
        raise ConfigError(f"{n} --init-image for {len(prompts)} prompts: give one image for "
                          "every prompt, one prompt for every image, or as many of each "
                          "(paired in order)")
    if len(masks) not in (0, 1, n):
        raise ConfigError(f"{len(masks)} --mask for {n} --init-image: give one mask for every "
                          "image, or one per image (in order)")
    files: dict[tuple[str, Path], runs.StartFile] = {}

    def read(flag: str, path: Path) -> runs.StartFile:
        if (flag, path) not in files:
            files[flag, path] = runs.StartFile.read(path, flag)
        return files[flag, path]

    images = [read("--init-image", path) for path in init_images]
    mask_files = [read("--mask", path) for path in masks]
    count = len(prompts)
    return runs.prompt_jobs(prompts, settings, negative_prompt,
                            [images[k % n] for k in range(count)],
                            [mask_files[k % n % len(mask_files)] for k in range(count)]
                            if mask_files else [], mask_blur)


def _describe(resolved, jobs: list | None = None) -> str:
    settings = resolved.settings
    a = settings.adaptive
    if not a.enabled:
        steps = f"{settings.sampler.steps} steps"
    elif a.mode == "replan":
        steps = (f"adaptive {a.min_steps}-{a.max_steps} steps (warm-up {a.warmup_steps}, "
                 f"{a.uncertainty.method})")
    else:
        steps = f"{settings.sampler.steps} steps, adaptive compute per step"
    if jobs and jobs[0].init_image is not None:
        steps += (f", {'inpainting' if jobs[0].mask else 'image to image'} at strength "
                  f"{settings.generation.strength:g}")
    if settings.hires.enabled:
        steps += f", hires fix x{settings.hires.scale:g} ({settings.hires.upscaler})"
    return (f"[dim]preset {escape(str(resolved.preset))}, model {escape(settings.model_id)}, "
            f"{settings.sampler.name} {steps}, {settings.device}[/]")


def _run(resolved, jobs: list, as_json: bool, console: Console) -> None:
    from sdaccel import runs
    from sdaccel.cli.render import ProgressRenderer
    from sdaccel.outputs import RunWriter

    settings = resolved.settings
    renderer = ProgressRenderer(console)
    console.print(_describe(resolved, jobs), highlight=False)
    engine, _ = runs.start_engine(settings, renderer)
    writer = RunWriter(settings, engine.components.name, engine.components.model_hash)
    try:
        for job, _index, result in runs.images(engine, jobs):
            # the next free file name: a plain run never overwrites
            record = writer.save(result, sources=job.sources())
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


def _run_jobs(resolved, prompts_file: Path, negative_prompt: str, mask_blur: int,
              as_json: bool, console: Console) -> None:
    """--prompts-file: this process's share of the jobs; the main process draws the progress
    of all of them (read from the per-process manifests) and merges the manifests."""
    from sdaccel import jobs
    from sdaccel.cli.render import JobsProgress, ProgressRenderer
    from sdaccel.events import ignore

    job_list = jobs.read_jobs(prompts_file, resolved.settings, negative_prompt, mask_blur)
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
