"""The correctness anchor: our loop gives diffusers' StableDiffusionPipeline latents (fp32)."""

import numpy as np
import pytest
import torch
from helpers import pipeline_latents, tiny_settings
from PIL import Image

from sdaccel.engine.engine import Engine
from sdaccel.engine.samplers import SAMPLER_NAMES
from sdaccel.outputs import RunWriter

PROMPTS = ["a red circle on a blue background", "two green squares"]


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_settings())


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
    theirs = pipeline_latents(engine, PROMPTS, seed=11)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_image_regenerates_alone_from_its_seed(engine, tmp_path):
    """README's claim: image j of a batch, generated alone with its seed, has latents within
    1e-4 (batch size changes float rounding only) and identical 8-bit pixels in its file."""
    s = engine.settings
    s.sampler.name, s.generation.num_images_per_prompt = "ddpm", 3
    s.generation.height = s.generation.width = 32
    batch = engine.generate(["a red circle"], seed=100)
    s.generation.num_images_per_prompt = 1
    alone = engine.generate(["a red circle"], seed=batch[2].seed)[0]
    assert batch[2].seed == 102
    assert (alone.latents - batch[2].latents).abs().max().item() <= 1e-4
    saved = []
    for out, result in (("batch", batch[2]), ("alone", alone)):
        s.io.out_dir = tmp_path / out
        with Image.open(RunWriter(s, model_name="random:tiny").save(result)["path"]) as png:
            saved.append(np.asarray(png.convert("RGB")))
    assert np.array_equal(*saved)
