"""`sdaccel generate`: prompts in, PNG files with their settings in metadata out."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from sdaccel.cli import options as opt
from sdaccel.cli.errors import reported_errors


def generate(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts.", show_default=False)],
    negative_prompt: Annotated[str, typer.Option("--negative-prompt", help="Negative prompt "
                                                 "for every image.")] = "",
    preset: opt.Preset = None,
    config: opt.ConfigFile = None,
    overrides: opt.Overrides = None,
    model: opt.Model = None,
    steps: opt.Steps = None,
    sampler: opt.Sampler = None,
    seed: opt.Seed = None,
    height: opt.Height = None,
    width: opt.Width = None,
    guidance: opt.Guidance = None,
    num_images: opt.NumImages = None,
    out_dir: opt.OutDir = None,
    as_json: opt.Json = False,
) -> None:
    """Generate images: files img_{index:03d}_steps{steps}.png in io.out_dir, never overwriting.

    Each prompt is one batch of num_images_per_prompt images; image k of the run uses seed + k.
    """
    console = Console(stderr=True, soft_wrap=True)
    with reported_errors(console):
        from sdaccel.settings import resolve_settings

        resolved = resolve_settings(
            preset, config,
            opt.shorthand(model, steps, sampler, seed, height, width, guidance, num_images,
                          out_dir),
            overrides,
        )
        _run(resolved, prompts, negative_prompt, as_json, console)


def _run(resolved, prompts: list[str], negative_prompt: str, as_json: bool,
         console: Console) -> None:
    from sdaccel.cli.render import ProgressRenderer, quiet_library_logs

    quiet_library_logs()
    from sdaccel.engine.engine import Engine
    from sdaccel.outputs import RunWriter

    settings = resolved.settings
    renderer = ProgressRenderer(console)
    a = settings.adaptive
    steps = (f"adaptive {a.min_steps}-{a.max_steps} steps (warm-up {a.warmup_steps}, "
             f"{a.uncertainty.method})" if a.enabled else f"{settings.sampler.steps} steps")
    console.print(f"[dim]preset {resolved.preset}, model {settings.model_id}, "
                  f"{settings.sampler.name} {steps}, {settings.device}[/]", highlight=False)
    engine = Engine(settings, on_event=renderer)
    writer = RunWriter(settings, model_name=engine.components.name)
    per_prompt = settings.generation.num_images_per_prompt
    try:
        for number, prompt in enumerate(prompts):
            results = engine.generate([prompt], negative_prompt,
                                      seed=settings.seed + number * per_prompt)
            for result in results:
                record = writer.save(result)
                renderer.image_saved(record["path"], result.seed, result.steps,
                                     result.seconds, prompt)
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
