"""The correctness anchor: our loop gives diffusers' StableDiffusionPipeline latents (fp32)."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import tiny_settings

from sdaccel.engine.engine import Engine
from sdaccel.engine.samplers import SAMPLER_NAMES, build_scheduler

PROMPTS = ["a red circle on a blue background", "two green squares"]


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_settings())


def diffusers_latents(engine, prompts, sampler, steps, height, width, guidance, per_prompt, seed):
    parts = engine.components
    pipe = StableDiffusionPipeline(
        vae=engine.vae, text_encoder=engine.text_encoder, tokenizer=parts.tokenizer,
        unet=engine.unet, scheduler=build_scheduler(sampler, parts.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(seed + k)
                  for k in range(len(prompts) * per_prompt)]
    return pipe(prompts, negative_prompt=[""] * len(prompts), num_inference_steps=steps,
                guidance_scale=guidance, height=height, width=width,
                num_images_per_prompt=per_prompt, generator=generators,
                output_type="latent").images


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
@pytest.mark.parametrize(("height", "width", "guidance", "per_prompt"), [
    (32, 32, 7.5, 1),   # square, guided
    (32, 48, 1.0, 2),   # non-square, no unconditional pass, several images per prompt
    (48, 32, 7.5, 2),
])
def test_latents_equal_diffusers(engine, sampler, height, width, guidance, per_prompt):
    s = engine.settings
    s.sampler.name, s.sampler.steps = sampler, 5
    s.generation.height, s.generation.width = height, width
    s.generation.guidance_scale, s.generation.num_images_per_prompt = guidance, per_prompt
    ours = torch.stack([r.latents for r in engine.generate(PROMPTS, seed=11)])
    theirs = diffusers_latents(engine, PROMPTS, sampler, 5, height, width, guidance,
                               per_prompt, seed=11)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_image_regenerates_alone_from_its_seed(engine):
    s = engine.settings
    s.sampler.name, s.generation.num_images_per_prompt = "ddpm", 3
    s.generation.height = s.generation.width = 32
    batch = engine.generate(["a red circle"], seed=100)
    s.generation.num_images_per_prompt = 1
    alone = engine.generate(["a red circle"], seed=batch[2].seed)[0]
    assert batch[2].seed == 102
    # Batch size changes the arithmetic slightly (random weights give latents of size ~10).
    assert torch.allclose(alone.latents, batch[2].latents, rtol=1e-4, atol=1e-4)
