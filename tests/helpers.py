"""What several test files share: the tiny model's settings and command-line flags.

Fixtures live in conftest.py; plain values and functions live here, imported as
`from helpers import ...` (pyproject puts tests/ on pytest's pythonpath).
"""

from __future__ import annotations

from collections.abc import Iterable

from sdaccel.settings import resolve_settings

# The random tiny model at 32x32, 4 steps, on the CPU, as settings overrides.
TINY = ["model_id=random:tiny", "generation.height=32", "generation.width=32",
        "sampler.steps=4", "device=cpu"]

# The same model and size as `sdaccel generate` flags, 2 steps (files end in `_steps2.png`).
TINY_FLAGS = ["--model", "random:tiny", "--height", "32", "--width", "32", "--steps", "2"]


def tiny_settings(*overrides: str, preset: str = "tiny"):
    """Settings for the random tiny model at 32x32, 4 steps, plus `overrides`."""
    return resolve_settings(preset, overrides=[*TINY, *overrides], environ={}).settings


def relative_error(a, b) -> float:
    """||a - b|| / ||b||, in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def set_flags(assignments: Iterable[str]) -> list[str]:
    """`--set KEY=VALUE` for each assignment: settings overrides as command-line arguments."""
    return [arg for assignment in assignments for arg in ("--set", assignment)]


def pipeline_latents(engine, prompts: list[str], seed: int, sampler: str | None = None,
                     scheduler=None, **call):
    """diffusers' StableDiffusionPipeline on `engine`'s own components and sampler (or
    `sampler`, or a diffusers `scheduler` made by the caller): the final latents for `prompts`,
    image k drawn from a CPU generator seeded `seed + k` as the engine does. Size, steps,
    guidance and images per prompt default to the engine's settings; `call` overrides them or
    adds pipeline arguments (`timesteps=[...]`, `eta=...`)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from sdaccel.engine.sampling.samplers import build_scheduler

    s, parts = engine.settings, engine.components
    pipe = StableDiffusionPipeline(
        vae=engine.vae, text_encoder=engine.text_encoder, tokenizer=parts.tokenizer,
        unet=engine.unet,
        scheduler=scheduler or build_scheduler(sampler or s.sampler.name,
                                               parts.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    options = {"height": s.generation.height, "width": s.generation.width,
               "guidance_scale": s.generation.guidance_scale,
               "num_images_per_prompt": s.generation.num_images_per_prompt, **call}
    if "timesteps" not in options:
        options.setdefault("num_inference_steps", s.sampler.steps)
    generators = [torch.Generator("cpu").manual_seed(seed + k)
                  for k in range(len(prompts) * options["num_images_per_prompt"])]
    return pipe(prompts, negative_prompt=[""] * len(prompts), generator=generators,
                output_type="latent", **options).images
