"""Image to image, inpainting and the hires fix: in fp32 the engine's latents are diffusers' own
(StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, and for the hires fix
StableDiffusionPipeline then the img2img pipeline on the upscaled latents), for every sampler."""

import diffusers
import numpy as np
import pytest
import torch
from helpers import tiny_settings
from PIL import Image

from sdaccel.engine.engine import Engine
from sdaccel.engine.sampling.samplers import SAMPLER_NAMES, build_scheduler
from sdaccel.errors import ConfigError
from sdaccel.settings import HiresSettings, SamplerSettings
from sdaccel.start import ImageStart

PROMPTS = ["a red circle on a blue background", "two green squares"]
SEED, STEPS, SIDE = 11, 6, 32
# The eta the pipelines are called with where the sampler takes one: the sampler's default.
ETA = {"ddim": {"eta": 0.0}, "tcd": {"eta": 0.3}}


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_settings())


def pictures(count: int, side: int = SIDE) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
            for _ in range(count)]


def masks(count: int, side: int = SIDE) -> list[Image.Image]:
    """White (draw again) on the right half, black (keep) on the left."""
    mask = np.zeros((side, side), dtype=np.uint8)
    mask[:, side // 2:] = 255
    return [Image.fromarray(mask)] * count


def pipeline(kind, engine, sampler: str):
    pipe = getattr(diffusers, kind)(
        vae=engine.vae, text_encoder=engine.text_encoder, tokenizer=engine.components.tokenizer,
        unet=engine.unet, scheduler=build_scheduler(sampler, engine.components.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(count: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(SEED + k) for k in range(count)]


def ours(engine, sampler: str, start: ImageStart, strength: float, **settings) -> torch.Tensor:
    generation = engine.settings.generation.model_copy(
        update={"strength": strength, "guidance_scale": 7.5, **settings})
    results = engine.generate(PROMPTS, seed=SEED, generation=generation, start=start,
                              sampler=SamplerSettings(name=sampler, steps=STEPS))
    return torch.stack([r.latents for r in results])


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_image_to_image_is_diffusers_img2img(engine, sampler):
    images = pictures(2)
    mine = ours(engine, sampler, ImageStart(images), 0.6)
    theirs = pipeline("StableDiffusionImg2ImgPipeline", engine, sampler)(
        PROMPTS, image=images, strength=0.6, num_inference_steps=STEPS, guidance_scale=7.5,
        negative_prompt=[""] * 2, generator=generators(2), output_type="latent",
        **ETA.get(sampler, {})).images
    assert (mine - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize(("sampler", "strength"), [
    *((name, 0.75) for name in SAMPLER_NAMES), ("dpm_solver++", 1.0), ("euler_a", 1.0)])
def test_inpainting_an_ordinary_model_is_diffusers_inpaint(engine, sampler, strength):
    images, kept = pictures(2), masks(2)
    mine = ours(engine, sampler, ImageStart(images, kept), strength)
    theirs = pipeline("StableDiffusionInpaintPipeline", engine, sampler)(
        PROMPTS, image=images, mask_image=kept, strength=strength, height=SIDE, width=SIDE,
        num_inference_steps=STEPS, guidance_scale=7.5, negative_prompt=[""] * 2,
        generator=generators(2), output_type="latent", **ETA.get(sampler, {})).images
    assert (mine - theirs).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def inpainting_engine(tmp_path_factory):
    """random:tiny with a 9-channel (inpainting) UNet, saved as a diffusers folder."""
    base = Engine(tiny_settings())
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
    folder = tmp_path_factory.mktemp("inpainting-model")
    diffusers.StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.components.tokenizer,
        unet=unet, scheduler=build_scheduler("ddim", base.components.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)
    return Engine(tiny_settings(f"model_id={folder}"))


@pytest.mark.parametrize(("sampler", "strength"), [("dpm_solver++", 1.0), ("euler_a", 0.7)])
def test_an_inpainting_model_reads_the_mask_as_diffusers_does(inpainting_engine, sampler,
                                                              strength):
    engine = inpainting_engine
    images, kept = pictures(2), masks(2)
    mine = ours(engine, sampler, ImageStart(images, kept), strength)
    theirs = pipeline("StableDiffusionInpaintPipeline", engine, sampler)(
        PROMPTS, image=images, mask_image=kept, strength=strength, height=SIDE, width=SIDE,
        num_inference_steps=STEPS, guidance_scale=7.5, negative_prompt=[""] * 2,
        generator=generators(2), output_type="latent").images
    assert (mine - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("upscaler", ["latent", "latent-nearest", "lanczos"])
def test_hires_fix_is_txt2img_then_img2img_on_the_upscaled_latents(engine, upscaler):
    hires = HiresSettings(enabled=True, scale=2, upscaler=upscaler, steps=4,
                          denoising_strength=0.5)
    generation = engine.settings.generation.model_copy(update={"guidance_scale": 7.5})
    sampler = SamplerSettings(name="dpm_solver++", steps=STEPS)
    results = engine.generate(PROMPTS, seed=SEED, generation=generation, sampler=sampler,
                              hires=hires)
    assert all(r.image.size == (2 * SIDE, 2 * SIDE) and r.hires == hires for r in results)
    # The results keep the request's size (A1111's `Size:`, the first pass's), so that their
    # settings make them again.
    assert all(r.generation == generation and r.strength is None for r in results)
    first = pipeline("StableDiffusionPipeline", engine, "dpm_solver++")(
        PROMPTS, height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=7.5,
        negative_prompt=[""] * 2, generator=generators(2), output_type="latent").images
    mode = "nearest" if upscaler == "latent-nearest" else "bilinear"
    latent_side = 2 * SIDE // engine.vae_scale_factor
    upscaled = torch.nn.functional.interpolate(first, size=(latent_side, latent_side), mode=mode)
    if upscaler == "lanczos":  # the decoded image resized, which the img2img pipeline encodes
        upscaled = [image.resize((2 * SIDE, 2 * SIDE), Image.LANCZOS)
                    for image in engine.decode(first)]
    theirs = pipeline("StableDiffusionImg2ImgPipeline", engine, "dpm_solver++")(
        PROMPTS, image=upscaled, strength=0.5, num_inference_steps=4, guidance_scale=7.5,
        negative_prompt=[""] * 2, generator=generators(2), output_type="latent").images
    mine = torch.stack([r.latents for r in results])
    assert (mine - theirs).abs().max().item() <= 1e-4
    # Both passes' UNet work is counted: 6 steps, then 2 of a 4-step plan.
    assert all(r.decisions == "F" * 8 and r.cost == 8 for r in results)


def test_results_say_how_they_started(engine):
    images = pictures(1)
    plain = engine.generate(PROMPTS[:1], seed=SEED)[0]
    redrawn = engine.generate(PROMPTS[:1], seed=SEED, start=ImageStart(images))[0]
    inpainted = engine.generate(PROMPTS[:1], seed=SEED,
                                start=ImageStart(images, masks(1), mask_blur=2))[0]
    assert (plain.strength, plain.mask_blur, plain.hires) == (None, None, None)
    assert (redrawn.strength, redrawn.mask_blur) == (0.75, None)
    assert (inpainted.strength, inpainted.mask_blur) == (0.75, 2)
    # strength 0.75 of a 4-step plan runs its last 3 steps
    assert redrawn.decisions == "FFF" and redrawn.steps == plain.steps == 4


def test_one_init_image_serves_every_prompt_and_each_image_keeps_its_seed(engine):
    images = pictures(1)
    both = engine.generate(PROMPTS, seed=SEED, start=ImageStart(images))
    alone = engine.generate(PROMPTS[1:], seed=SEED + 1, start=ImageStart(images))[0]
    assert (both[1].latents - alone.latents).abs().max().item() <= 1e-5


def test_per_step_adaptive_compute_starts_from_an_image():
    engine = Engine(tiny_settings("adaptive.enabled=true", "adaptive.mode=per_step",
                                  "sampler.steps=8", "adaptive.cache.interval=2"))
    result = engine.generate(PROMPTS[:1], seed=SEED, start=ImageStart(pictures(1)))[0]
    assert len(result.decisions) == 6 and result.decisions[0] == "F"  # int(8 x 0.75) steps
    assert result.cost < 6


def test_what_cannot_start_from_an_image_is_refused(engine):
    with pytest.raises(ConfigError, match="2 masks for 1 init images") as error:
        engine.generate(PROMPTS[:1], start=ImageStart(pictures(1), masks(2)))
    assert error.value.key == "mask"
    replanning = Engine(tiny_settings("adaptive.enabled=true", "adaptive.mode=replan",
                                      "sampler.name=dpm_solver++"))
    with pytest.raises(ConfigError, match="replan") as error:
        replanning.generate(PROMPTS[:1], start=ImageStart(pictures(1)))
    assert error.value.key == "adaptive.mode"
