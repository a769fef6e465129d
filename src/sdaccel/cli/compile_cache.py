"""`sdaccel compile-cache warm|list|load|clear`: compiled artifacts kept for a fast second start.

Entries live in $SDACCEL_CACHE_DIR/compile (else the platform cache directory); `generate` and
`bench` load a matching entry by themselves whenever they compile (compile.cache, default on).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sdaccel.cli import options as opt
from sdaccel.cli.command import command, stdout_console
from sdaccel.errors import ConfigError

if TYPE_CHECKING:
    from sdaccel.settings import ResolvedSettings

app = typer.Typer(
    name="compile-cache", no_args_is_help=True,
    help="Store compiled artifacts per preset, shape and batch; later runs start warm.",
)

Sizes = Annotated[list[str] | None, typer.Option(
    "--size", help="HEIGHTxWIDTH to compile for; repeatable.  \\[default: the settings' size]",
    show_default=False)]
Batch = opt.shorthand(int, "--batch", "--num-images", "-n", help="Images per call "
                      "(generation.num_images_per_prompt).  \\[default: the settings' value]")
# The same flags as `generate` but --out-dir (no image is kept), so the same command line finds
# the same entry; steps, seed and LoRAs do not change the graph, but are accepted.
Prompt = Annotated[str | None, typer.Option(
    "--prompt", help="Prompt of the compiling call (any prompt gives the same graph).  "
    "\\[default: a fixed one]", show_default=False)]


def _sizes(sizes: list[str] | None, settings) -> list[tuple[int, int]]:
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
@command(exclude=opt.NO_IMAGES, aliases={"num_images": Batch}, engine=True)
def warm(
    console: Console,
    settings: ResolvedSettings,
    sizes: Sizes = None,
    prompt: Prompt = None,
    as_json: opt.Json = False,
) -> None:
    """Compile the settings cold for each size and batch, and store the artifacts."""
    _start(console, settings, prompt, as_json, _sizes(sizes, settings.settings))


@app.command("list")
@command(settings=None)
def list_(console: Console, as_json: opt.Json = False) -> None:
    """What is cached: preset, shape, versions, device, cold start time, size on disk."""
    from sdaccel.compile_cache import compile_dir, environment, list_entries

    entries = list_entries()
    here = environment()
    records = [{**e.summary(), "usable": not e.mismatch(here),
                "mismatch": e.mismatch(here)} for e in entries]
    if as_json:
        typer.echo(json.dumps(records, indent=2))
        return
    if not records:
        console.print(f"compile cache {escape(str(compile_dir()))} is empty", highlight=False)
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
    stdout_console().print(table)


@app.command("load")
@command(exclude=opt.NO_IMAGES, aliases={"num_images": Batch}, engine=True)
def load(
    console: Console,
    settings: ResolvedSettings,
    prompt: Prompt = None,
    as_json: opt.Json = False,
) -> None:
    """Load the matching entries, time a warm start (build + first image), compare with cold."""
    _start(console, settings, prompt, as_json)


def _start(console: Console, resolved: ResolvedSettings, prompt: str | None, as_json: bool,
           sizes: list[tuple[int, int]] | None = None) -> None:
    """The body `warm` and `load` share: a cold start compiled and stored for each of `sizes`,
    or (no sizes) a warm start from the stored entries, timed beside its cold one. Progress on
    the console, then a line (and a JSON record with --json) per start."""
    from sdaccel import compile_cache, runs
    from sdaccel.cli.render import ProgressRenderer

    settings, preset = resolved.settings, resolved.preset
    prompt = prompt or compile_cache.DEFAULT_PROMPT
    batch = settings.generation.num_images_per_prompt
    if sizes is not None:
        console.print(f"[dim]compiling preset {escape(str(preset))} ({escape(settings.model_id)}, "
                      f"{settings.compile.mode}) for {', '.join(f'{h}x{w}' for h, w in sizes)}, "
                      f"batch {batch}: cold, this takes a while[/]", highlight=False)
    renderer = ProgressRenderer(console)
    try:
        if sizes is not None:
            reports = [_cold(result) for result in compile_cache.warm(
                settings, preset, sizes, batch, prompt, on_event=renderer)]
        else:
            reports = [_warm(preset, runs.warm_start(settings, preset, prompt,
                                                     on_event=renderer))]
    finally:
        renderer.close()
    for record, message in reports:
        if as_json:
            typer.echo(json.dumps(record))
        console.print(message, highlight=False)


def _cold(result) -> tuple[dict, str]:
    """The record and line of one stored cold start (a compile_cache.WarmResult)."""
    record = {**result.entry.summary(), "cold_seconds": round(result.cold_seconds, 3)}
    return record, (f"[green]cached[/] {record['key']}  cold start {result.cold_seconds:.1f} s  "
                    f"{record['size_bytes'] / 2**20:.1f} MiB  [dim]{escape(record['path'])}[/]")


def _warm(preset: str, result) -> tuple[dict, str]:
    """The record and line of one timed warm start (a runs.WarmStart)."""
    entry, warm_seconds = result.entry, result.warm_seconds
    cold = entry.meta.get("cold_seconds") if entry else None
    record = {"preset": preset, "key": result.key, "loaded": [e.key for e in result.loaded],
              "warm_seconds": round(warm_seconds, 3), "cold_seconds": cold,
              "speedup": round(cold / warm_seconds, 2) if cold else None}
    if entry is None:
        return record, (f"[yellow]no usable entry {result.key} for this shape and batch[/] "
                        f"(warm start {warm_seconds:.1f} s was a cold compile); run `sdaccel "
                        "compile-cache warm` with the same settings")
    return record, (f"[green]loaded[/] {result.key}: start {warm_seconds:.1f} s warm vs "
                    f"{cold:.1f} s cold ({record['speedup']}x)")


@app.command("clear")
@command(settings=None)
def clear(
    console: Console,
    keys: Annotated[list[str] | None, typer.Argument(
        help="Entries to remove (see list); all when none are given.", show_default=False)]
    = None,
) -> None:
    """Remove cache entries (all of them when no key is given)."""
    from sdaccel.compile_cache import clear as clear_cache
    from sdaccel.compile_cache import compile_dir

    removed = clear_cache(keys or [])
    console.print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'} from "
                  f"{compile_dir()}", highlight=False)
