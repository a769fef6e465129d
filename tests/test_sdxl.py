"""SDXL: the engine's latents are StableDiffusionXLPipeline's (fp32) for every sampler, on
random:sdxl-tiny (diffusers' own tiny SDXL test architecture, seeded random weights)."""

import diffusers
import pytest
import torch
from helpers import tiny_settings
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sdaccel.cli import app
from sdaccel.engine.engine import Engine
from sdaccel.engine.sampling.samplers import SAMPLER_NAMES, build_scheduler
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


def sdxl_embedding(path, count=2, widths=(32, 32), seed=0):
    """An SDXL embedding file as A1111 and civitai ship them: clip_l and clip_g vectors."""
    generator = torch.Generator().manual_seed(seed)
    save_file({"clip_l": torch.randn(count, widths[0], generator=generator),
               "clip_g": torch.randn(count, widths[1], generator=generator)}, str(path))
    return path


def test_an_sdxl_embedding_is_what_diffusers_makes_of_it(tmp_path):
    """A two-vector clip_l / clip_g file: the engine's latents are StableDiffusionXLPipeline's
    after loading the clip_g vectors into text encoder 2 and the clip_l ones into text encoder
    1 (diffusers' documented way), and the token changes the image."""
    path = sdxl_embedding(tmp_path / "glowing.safetensors")
    engine = Engine(tiny_settings("model_id=random:sdxl-tiny", "generation.height=64",
                                  "generation.width=64", "generation.guidance_scale=5",
                                  f"embeddings=[{path}]"))
    prompts = ["a glowing circle on a blue background"]
    sampler = SamplerSettings(name="dpm_solver++", steps=STEPS)
    results = engine.generate(prompts, seed=SEED, sampler=sampler)
    mine = torch.stack([r.latents for r in results])
    plain = Engine(tiny_settings("model_id=random:sdxl-tiny", "generation.height=64",
                                 "generation.width=64", "generation.guidance_scale=5"))
    pipe = sdxl_pipeline(plain, "dpm_solver++")
    vectors = load_file(str(path))
    pipe.load_textual_inversion(vectors["clip_g"], token="glowing",
                                text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(vectors["clip_l"], token="glowing",
                                text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    theirs = pipe(prompts, height=64, width=64, num_inference_steps=STEPS, guidance_scale=5.0,
                  generator=generators(1), output_type="latent").images
    assert (mine - theirs).abs().max().item() <= 1e-4
    without = plain.generate(["a circle on a blue background"], seed=SEED, sampler=sampler)
    assert (mine[0] - without[0].latents).abs().max().item() > 1e-2
    assert results[0].embeddings[0]["token"] == "glowing"


@pytest.mark.parametrize(("model", "make", "message"), [
    ("random:sdxl-tiny", "sd15", "is an SD 1.x embedding (one set of 32-value vectors); this "
                                 "model is SDXL, whose embeddings hold clip_l and clip_g"),
    ("bundled:shapes", "sdxl", "is an SDXL embedding (clip_l and clip_g vectors); this model "
                               "is SD 1.x"),
    ("random:sdxl-tiny", "wide", "has vectors of 1280 values; the text encoder of "
                                 "'random:sdxl-tiny' takes 32"),
    ("random:sdxl-tiny", "uneven", "its clip_l and clip_g parts hold 2 and 3 vectors"),
])
def test_an_embedding_of_the_other_family_is_one_line(tmp_path, model, make, message):
    path = tmp_path / f"{make}.safetensors"
    if make == "sd15":
        save_file({"emb_params": torch.zeros(1, 32)}, str(path))
    elif make == "uneven":
        save_file({"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(3, 32)}, str(path))
    else:
        sdxl_embedding(path, widths=(32, 1280) if make == "wide" else (768, 1280))
    out = tmp_path / "out"
    sizes = ["--height", "64", "--width", "64"] if model == "random:sdxl-tiny" else []
    result = CliRunner().invoke(app, ["generate", "a red circle", "--model", model, *sizes,
                                      "--steps", "2", "--embedding", str(path),
                                      "--out-dir", str(out)])
    assert result.exit_code == 3, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error:") and str(path) in line and message in line, line
    assert not out.exists()
