"""Option aliases shared by the commands (`cli/command.py` adds the settings ones to each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sdaccel.catalogue import SAMPLER_NAMES

Preset = Annotated[
    str | None,
    typer.Option("--preset", "-p", help="Packaged preset (see inspect-config --list-presets); "
                 "the seed's file names work too.  [default: tiny]", show_default=False),
]
ConfigFile = Annotated[
    Path | None,
    typer.Option("--config", "--cfg", "-c", help="YAML settings file (the seed's schema), "
                 "layered over the preset.", show_default=False),
]
Presets = Annotated[
    list[str] | None,
    typer.Option("--preset", "-p", help="Preset to measure; repeat to compare several (the "
                 "seed's file names work too).  [default: tiny]", show_default=False),
]
Configs = Annotated[
    list[Path] | None,
    typer.Option("--config", "--cfg", "-c", help="YAML settings file to measure (layered over "
                 "the default preset); repeatable.", show_default=False),
]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="dotted.key=value, highest priority; repeatable "
                 "(e.g. --set sampler.steps=12).", show_default=False),
]
Model = Annotated[str | None, typer.Option(
    "--model", "-m", help="Model: hub id, folder, .safetensors file, random:tiny|sd15, "
    "bundled:shapes.", show_default=False, rich_help_panel="Shorthand settings")]
Steps = Annotated[int | None, typer.Option(
    "--steps", help="sampler.steps", show_default=False, rich_help_panel="Shorthand settings")]
Sampler = Annotated[str | None, typer.Option(
    "--sampler", help=f"sampler.name: {', '.join(SAMPLER_NAMES)}",
    show_default=False, rich_help_panel="Shorthand settings")]
Seed = Annotated[int | None, typer.Option(
    "--seed", help="seed (image k of a run uses seed + k)", show_default=False,
    rich_help_panel="Shorthand settings")]
Height = Annotated[int | None, typer.Option(
    "--height", help="generation.height", show_default=False,
    rich_help_panel="Shorthand settings")]
Width = Annotated[int | None, typer.Option(
    "--width", help="generation.width", show_default=False, rich_help_panel="Shorthand settings")]
Guidance = Annotated[float | None, typer.Option(
    "--guidance", help="generation.guidance_scale (<= 1: no unconditional pass)",
    show_default=False, rich_help_panel="Shorthand settings")]
NumImages = Annotated[int | None, typer.Option(
    "--num-images", "-n", help="generation.num_images_per_prompt", show_default=False,
    rich_help_panel="Shorthand settings")]
OutDir = Annotated[Path | None, typer.Option(
    "--out-dir", "-o", help="io.out_dir", show_default=False,
    rich_help_panel="Shorthand settings")]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout; "
                                    "everything else goes to stderr.")]

