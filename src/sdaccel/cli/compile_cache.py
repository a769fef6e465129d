"""`sdaccel compile-cache warm|list|load|clear`: compiled artifacts kept for a fast second start.

Entries live in $SDACCEL_CACHE_DIR/compile (else the platform cache directory); `generate` and
`bench` load a matching entry by themselves whenever they compile (compile.cache, default on).
"""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sdaccel.cli import options as opt
from sdaccel.cli.errors import reported_errors

app = typer.Typer(
    name="compile-cache", no_args_is_help=True,
    help="Store compiled artifacts per preset, shape and batch; later runs start warm.",
)

Sizes = Annotated[list[str] | None, typer.Option(
    "--size", help="HEIGHTxWIDTH to compile for; repeatable.  [default: the settings' size]",
    show_default=False)]
Batch = Annotated[int | None, typer.Option(
    "--batch", "--num-images", "-n", help="Images per call (generation.num_images_per_prompt)."
    "  [default: the settings' value]", show_default=False,
    rich_help_panel="Shorthand settings")]
Prompt = Annotated[str, typer.Option("--prompt", help="Prompt of the compiling call (any prompt "
                                     "gives the same graph).")]


def _settings(preset, config, overrides, model, steps, sampler, seed, height, width, guidance,
              batch):
    """The same layers and shorthand flags as `generate`, so the same command line finds the
    same entry (steps and seed do not change the graph, but are accepted)."""
    return opt.resolve(preset, config, overrides, model=model, steps=steps, sampler=sampler,
                       seed=seed, height=height, width=width, guidance=guidance,
                       num_images=batch)


def _sizes(sizes: list[str] | None, settings) -> list[tuple[int, int]]:
    from sdaccel.errors import ConfigError

    if not sizes:
        return [(settings.generation.height, settings.generation.width)]
    parsed = []
    for text in sizes:
        height, sep, width = text.lower().partition("x")
        if not sep or not height.isdigit() or not width.isdigit():
            raise ConfigError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 512x512")
        h, w = int(height), int(width)
        if h % 8 or w % 8 or not h or not w:
            raise ConfigError(f"--size {text!r}: height and width must be positive multiples "
                              "of 8")
        parsed.append((h, w))
    return parsed


@app.command("warm")
def warm(
    preset: opt.Preset = None,
    config: opt.ConfigFile = None,
    overrides: opt.Overrides = None,
    sizes: Sizes = None,
    batch: Batch = None,
    prompt: Prompt = "a red circle on a blue background",
    model: opt.Model = None,
    steps: opt.Steps = None,
    sampler: opt.Sampler = None,
    seed: opt.Seed = None,
    height: opt.Height = None,
    width: opt.Width = None,
    guidance: opt.Guidance = None,
    as_json: opt.Json = False,
) -> None:
    """Compile the settings cold for each size and batch, and store the artifacts."""
    console = Console(stderr=True, soft_wrap=True)
    with reported_errors(console):
        resolved = _settings(preset, config, overrides, model, steps, sampler, seed, height,
                             width, guidance, batch)
        shapes = _sizes(sizes, resolved.settings)
        from sdaccel.cli.render import ProgressRenderer, quiet_library_logs

        quiet_library_logs()
        from sdaccel.engine.compile import warm as warm_cache

        console.print(f"[dim]compiling preset {resolved.preset} ({resolved.settings.model_id}, "
                      f"{resolved.settings.compile.mode}) for "
                      f"{', '.join(f'{h}x{w}' for h, w in shapes)}, batch "
                      f"{resolved.settings.generation.num_images_per_prompt}: cold, this takes "
                      "a while[/]", highlight=False)
        renderer = ProgressRenderer(console)
        try:
            results = warm_cache(resolved.settings, resolved.preset, shapes,
                                 resolved.settings.generation.num_images_per_prompt, prompt,
                                 on_event=renderer)
        finally:
            renderer.close()
        for result in results:
            record = {**result.entry.summary(), "cold_seconds": round(result.cold_seconds, 3)}
            if as_json:
                typer.echo(json.dumps(record))
            console.print(f"[green]cached[/] {record['key']}  cold start "
                          f"{result.cold_seconds:.1f} s  {record['size_bytes'] / 2**20:.1f} MiB"
                          f"  [dim]{escape(record['path'])}[/]", highlight=False)


@app.command("list")
def list_(as_json: opt.Json = False) -> None:
    """What is cached: preset, shape, versions, device, cold start time, size on disk."""
    console = Console(stderr=True, soft_wrap=True)
    with reported_errors(console):
        from sdaccel.engine.compile import compile_dir, environment, list_entries

        entries = list_entries()
        here = environment()
        records = [{**e.summary(), "usable": not e.mismatch(here),
                    "mismatch": e.mismatch(here)} for e in entries]
        if as_json:
            typer.echo(json.dumps(records, indent=2))
            return
        if not records:
            console.print(f"compile cache {compile_dir()} is empty", highlight=False)
            return
        table = Table(title=f"compile cache: {escape(str(compile_dir()))}", title_justify="left")
        for column in ("key", "preset", "model", "size", "batch", "torch", "triton",
                       "diffusers", "device", "cold s", "MiB", "status"):
            table.add_column(column)
        for r in records:
            status = "ok" if r["usable"] else "[yellow]skipped: " + escape(
                "; ".join(r["mismatch"])) + "[/]"
            table.add_row(r["key"], str(r["preset"]), escape(str(r["model_id"])),
                          f"{r['height']}x{r['width']}", str(r["batch"]), str(r.get("torch")),
                          str(r.get("triton")), str(r.get("diffusers")),
                          escape(str(r.get("device_name"))), str(r["cold_seconds"]),
                          f"{r['size_bytes'] / 2**20:.1f}", status)
        out = Console()
        if not out.is_terminal:  # files and pipes get every column unwrapped
            out = Console(width=240)
        out.print(table)


@app.command("load")
def load(
    preset: opt.Preset = None,
    config: opt.ConfigFile = None,
    overrides: opt.Overrides = None,
    batch: Batch = None,
    prompt: Prompt = "a red circle on a blue background",
    model: opt.Model = None,
    steps: opt.Steps = None,
    sampler: opt.Sampler = None,
    seed: opt.Seed = None,
    height: opt.Height = None,
    width: opt.Width = None,
    guidance: opt.Guidance = None,
    as_json: opt.Json = False,
) -> None:
    """Load the matching entries, time a warm start (build + first image), compare with cold."""
    console = Console(stderr=True, soft_wrap=True)
    with reported_errors(console):
        from sdaccel.errors import ConfigError

        resolved = _settings(preset, config, overrides, model, steps, sampler, seed, height,
                             width, guidance, batch)
        settings = resolved.settings
        if not settings.compile.enabled or not settings.compile.cache:
            raise ConfigError(f"compile-cache load: preset {resolved.preset!r} has "
                              "compile.enabled=false or compile.cache=false; nothing to load")
        from sdaccel.cli.render import ProgressRenderer, quiet_library_logs

        quiet_library_logs()
        from sdaccel.engine.compile import entry_key
        from sdaccel.engine.engine import Engine

        renderer = ProgressRenderer(console)
        try:
            started = time.perf_counter()
            engine = Engine(settings, on_event=renderer)
            engine.generate([prompt])
            warm_seconds = time.perf_counter() - started
        finally:
            renderer.close()
        key = entry_key(settings, settings.generation.num_images_per_prompt)
        entry = next((e for e in engine.compile_cache if e.key == key), None)
        cold = entry.meta.get("cold_seconds") if entry else None
        record = {"preset": resolved.preset, "key": key, "loaded": [e.key for e in
                                                                    engine.compile_cache],
                  "warm_seconds": round(warm_seconds, 3), "cold_seconds": cold,
                  "speedup": round(cold / warm_seconds, 2) if cold else None}
        if as_json:
            typer.echo(json.dumps(record))
        if entry is None:
            console.print(f"[yellow]no usable entry {key} for this shape and batch[/] (warm "
                          f"start {warm_seconds:.1f} s was a cold compile); run `sdaccel "
                          "compile-cache warm` with the same settings", highlight=False)
        else:
            console.print(f"[green]loaded[/] {key}: start {warm_seconds:.1f} s warm vs "
                          f"{cold:.1f} s cold ({record['speedup']}x)", highlight=False)


@app.command("clear")
def clear(
    keys: Annotated[list[str] | None, typer.Argument(
        help="Entries to remove (see list); all when none are given.", show_default=False)]
    = None,
) -> None:
    """Remove cache entries (all of them when no key is given)."""
    console = Console(stderr=True, soft_wrap=True)
    with reported_errors(console):
        from sdaccel.engine.compile import clear as clear_cache
        from sdaccel.engine.compile import compile_dir

        removed = clear_cache(keys or [])
        console.print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} from "
                      f"{compile_dir()}", highlight=False)
