"""Option aliases shared by the commands (`cli/command.py` adds the settings ones to each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sdaccel.catalogue import SAMPLER_NAMES, SCHEDULES

Preset = Annotated[
    str | None,
    typer.Option("--preset", "-p", help="Packaged preset (see inspect-config --list-presets); "
                 "the seed's file names work too.  \\[default: tiny]", show_default=False),
]
ConfigFile = Annotated[
    Path | None,
    typer.Option("--config", "--cfg", "-c", help="YAML settings file (the seed's schema), "
                 "layered over the preset.", show_default=False),
]
Presets = Annotated[
    list[str] | None,
    typer.Option("--preset", "-p", help="Preset to measure; repeat to compare several (the "
                 "seed's file names work too).  \\[default: tiny]", show_default=False),
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


def shorthand(kind: type, *names: str, help: str, **extra: Any) -> Any:  # noqa: A002
    """The option alias of a shorthand flag: `kind` or None (None: the flag was not given)."""
    return Annotated[kind | None, typer.Option(*names, help=help, show_default=False,
                                               rich_help_panel="Shorthand settings", **extra)]


# Shorthand flag (parameter name) -> (the settings key it sets, its option). Adding one is one
# line here: every command that reads settings takes it (cli/command.py), but a command that
# excludes it by name.
SHORTHAND: dict[str, tuple[str, Any]] = {
    "model": ("model_id", shorthand(str, "--model", "-m", help="Model: hub id, folder, "
                                    ".safetensors file, random:tiny|sd15, bundled:shapes.")),
    "lora": ("loras", shorthand(list[str], "--lora", help="loras: a LoRA file (kohya/A1111 or "
                                "diffusers format), FILE or FILE:WEIGHT (default 1); "
                                "repeatable; replaces the settings' list.")),
    "steps": ("sampler.steps", shorthand(int, "--steps", help="sampler.steps")),
    "sampler": ("sampler.name", shorthand(str, "--sampler",
                                          help=f"sampler.name: {', '.join(SAMPLER_NAMES)}")),
    "schedule": ("sampler.schedule", shorthand(str, "--schedule", help="sampler.schedule: "
                                               f"{', '.join(SCHEDULES)}")),
    "seed": ("seed", shorthand(int, "--seed", help="seed (image k of a run uses seed + k)")),
    "height": ("generation.height", shorthand(int, "--height", help="generation.height")),
    "width": ("generation.width", shorthand(int, "--width", help="generation.width")),
    "guidance": ("generation.guidance_scale", shorthand(
        float, "--guidance", help="generation.guidance_scale (<= 1: no unconditional pass)")),
    "num_images": ("generation.num_images_per_prompt", shorthand(
        int, "--num-images", "-n", help="generation.num_images_per_prompt")),
    "out_dir": ("io.out_dir", shorthand(Path, "--out-dir", "-o", help="io.out_dir")),
    "embedding": ("embeddings", shorthand(list[Path], "--embedding", help="embeddings: a "
                                          "textual-inversion file (.pt, .safetensors, .bin or "
                                          "a diffusers folder); repeatable")),
    "tiny_decoder": ("tiny_decoder", shorthand(str, "--tiny-decoder", help="tiny_decoder: TAESD "
                                               "(taesd_decoder.safetensors, a folder or hub id) "
                                               "decodes instead of the model's VAE")),
    "strength": ("generation.strength", shorthand(
        float, "--strength", help="generation.strength: with an init image, how much of it is "
        "drawn again, 0 < S <= 1 (A1111's denoising strength)")),
    "hires": ("hires.enabled", shorthand(bool, "--hires", help="hires.enabled: the hires fix "
                                         "(generate, upscale, draw again)", metavar="")),
    "hires_scale": ("hires.scale", shorthand(float, "--hires-scale", help="hires.scale")),
    "hires_upscaler": ("hires.upscaler", shorthand(str, "--hires-upscaler", help="hires.upscaler: "
                                                   "latent, latent-nearest, lanczos")),
    "hires_steps": ("hires.steps", shorthand(int, "--hires-steps", help="hires.steps (0: the "
                                             "sampler's steps)")),
    "hires_strength": ("hires.denoising_strength", shorthand(
        float, "--hires-strength", help="hires.denoising_strength")),
}

# What commands that write no image leave out of SHORTHAND (`command(exclude=...)`).
NO_IMAGES = ("out_dir",)

Json = Annotated[bool, typer.Option("--json", help="Machine-readable output on stdout; "
                                    "everything else goes to stderr.")]

