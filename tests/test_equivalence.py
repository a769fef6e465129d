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
    size = {"height": height, "width": width, "guidance_scale": guidance,
            "num_images_per_prompt": per_prompt}
    ours = torch.stack([r.latents for r in engine.generate(
        PROMPTS, seed=11, generation=engine.settings.generation.model_copy(update=size),
        sampler=engine.settings.sampler.model_copy(update={"name": sampler, "steps": 5}))])
    theirs = pipeline_latents(engine, PROMPTS, seed=11, sampler=sampler, num_inference_steps=5,
                              **size)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_image_regenerates_alone_from_its_seed(engine, tmp_path):
    """README's claim: image j of a batch, generated alone with its seed, has latents within
    1e-4 (batch size changes float rounding only) and identical 8-bit pixels in its file."""
    s = engine.settings
    ddpm = s.sampler.model_copy(update={"name": "ddpm"})

    def generation(images: int):
        return s.generation.model_copy(update={"height": 32, "width": 32,
                                               "num_images_per_prompt": images})

    batch = engine.generate(["a red circle"], seed=100, generation=generation(3), sampler=ddpm)
    alone = engine.generate(["a red circle"], seed=batch[2].seed, generation=generation(1),
                            sampler=ddpm)[0]
    assert batch[2].seed == 102
    assert (alone.latents - batch[2].latents).abs().max().item() <= 1e-4
    saved = []
    for out, result in (("batch", batch[2]), ("alone", alone)):
        writes_to = s.model_copy(update={"io": s.io.model_copy(update={"out_dir": tmp_path / out})})
        with Image.open(RunWriter(writes_to, model_name="random:tiny").save(result)["path"]) as png:
            saved.append(np.asarray(png.convert("RGB")))
    assert np.array_equal(*saved)
