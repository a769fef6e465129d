"""SDXL: the engine's latents are StableDiffusionXLPipeline's (fp32) for every sampler, on
random:sdxl-tiny (diffusers' own tiny SDXL test architecture, seeded random weights)."""

import diffusers
import pytest
import torch
from helpers import tiny_settings

from sdaccel.engine.engine import Engine
from sdaccel.engine.sampling.samplers import SAMPLER_NAMES, build_scheduler
from sdaccel.errors import ConfigError
from sdaccel.settings import SamplerSettings
from sdaccel.start import ImageStart

PROMPTS = ["a red circle on a blue background", "two green squares"]
SEED, STEPS = 5, 5
ETA = {"ddim": {"eta": 0.0}, "tcd": {"eta": 0.3}}


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_settings("model_id=random:sdxl-tiny", "generation.height=64",
                                "generation.width=64", "generation.guidance_scale=5"))


def sdxl_pipeline(engine, sampler: str):
    parts = engine.components
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=engine.vae, text_encoder=engine.text_encoder, text_encoder_2=engine.text_encoder_2,
        tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=engine.unet,
        scheduler=build_scheduler(sampler, parts.scheduler_config), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(count: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(SEED + k) for k in range(count)]


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_sdxl_latents_are_the_pipelines(engine, sampler):
    """An empty negative prompt is zeros (the model's force_zeros_for_empty_prompt), which is
    what the pipeline does with negative_prompt=None."""
    results = engine.generate(PROMPTS, seed=SEED,
                              sampler=SamplerSettings(name=sampler, steps=STEPS))
    mine = torch.stack([r.latents for r in results])
    theirs = sdxl_pipeline(engine, sampler)(
        PROMPTS, height=64, width=64, num_inference_steps=STEPS, guidance_scale=5.0,
        generator=generators(2), output_type="latent", **ETA.get(sampler, {})).images
    assert (mine - theirs).abs().max().item() <= 1e-4


def test_a_negative_prompt_and_several_images_per_prompt(engine):
    generation = engine.settings.generation.model_copy(update={"num_images_per_prompt": 2})
    results = engine.generate(PROMPTS, "blurry", seed=SEED, generation=generation,
                              sampler=SamplerSettings(name="euler_a", steps=STEPS))
    mine = torch.stack([r.latents for r in results])
    theirs = sdxl_pipeline(engine, "euler_a")(
        PROMPTS, negative_prompt=["blurry"] * 2, height=64, width=64,
        num_inference_steps=STEPS, guidance_scale=5.0, num_images_per_prompt=2,
        generator=generators(4), output_type="latent").images
    assert (mine - theirs).abs().max().item() <= 1e-4


def test_sdxl_image_to_image_is_the_img2img_pipeline(engine):
    images = [r.image for r in engine.generate(PROMPTS, seed=1)]
    start = engine.settings.generation.model_copy(update={"strength": 0.6})
    mine = torch.stack([r.latents for r in engine.generate(
        PROMPTS, seed=SEED, generation=start, start=ImageStart(images),
        sampler=SamplerSettings(name="dpm_solver++", steps=STEPS))])
    parts = engine.components
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=engine.vae, text_encoder=engine.text_encoder, text_encoder_2=engine.text_encoder_2,
        tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=engine.unet,
        scheduler=build_scheduler("dpm_solver++", parts.scheduler_config),
        add_watermarker=False, requires_aesthetics_score=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPTS, image=images, strength=0.6, num_inference_steps=STEPS,
                  guidance_scale=5.0, generator=generators(2), output_type="latent").images
    assert (mine - theirs).abs().max().item() <= 1e-4


def test_an_fp16_sdxl_vae_runs_in_fp32_and_says_so():
    events = []
    engine = Engine(tiny_settings("model_id=random:sdxl-tiny", "vae_dtype=fp16"),
                    on_event=events.append)
    assert engine.vae.dtype == torch.float32 and engine.settings.vae_dtype == "fp32"
    assert any("force_upcast" in getattr(e, "message", "") for e in events)


def test_sdxl_refuses_what_it_cannot_do_yet(tmp_path):
    embedding = tmp_path / "word.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": "word"}, embedding)
    with pytest.raises(ConfigError, match="SDXL"):
        Engine(tiny_settings("model_id=random:sdxl-tiny", f"embeddings=[{embedding}]"))
