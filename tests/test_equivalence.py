"""The correctness anchor: our loop gives diffusers' StableDiffusionPipeline latents (fp32),
for every sampler, every schedule it takes, its eta, and with a LoRA."""

import json

import diffusers
import numpy as np
import pytest
import torch
from helpers import pipeline_latents, tiny_settings
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdaccel.catalogue import SAMPLER_TABLE
from sdaccel.engine.engine import Engine
from sdaccel.engine.sampling.samplers import SAMPLER_NAMES
from sdaccel.events import BatchStarted, StepDone
from sdaccel.outputs import RunWriter
from sdaccel.settings import LoraEntry, SamplerSettings
from sdaccel.shapes import BUNDLED_DIR

PROMPTS = ["a red circle on a blue background", "two green squares"]

# Each sampler and schedule in diffusers' own terms, written out here rather than read from the
# catalogue: a wrong class or option there gives other latents than these.
DIFFUSERS = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm_solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm_solver++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
}
SCHEDULES = {"default": {}, "karras": {"use_karras_sigmas": True},
             "exponential": {"use_exponential_sigmas": True},
             "trailing": {"timestep_spacing": "trailing"}}
# The eta StableDiffusionPipeline is called with where the sampler's step takes one: the
# sampler's own default when sampler.eta is unset (the pipeline's own default is 0).
DEFAULT_ETA = {"ddim": 0.0, "tcd": 0.3}


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_settings())


def their_scheduler(engine, sampler: str, schedule: str = "default"):
    name, options = DIFFUSERS[sampler]
    return getattr(diffusers, name).from_config(engine.components.scheduler_config, **options,
                                                **SCHEDULES[schedule])


def both_latents(engine, sampler: str, schedule: str = "default", eta: float | None = None,
                 steps: int = 5, height: int = 32, width: int = 32, guidance: float = 7.5,
                 per_prompt: int = 1, loras=()):
    """(ours, diffusers') final latents for PROMPTS at seed 11."""
    size = {"height": height, "width": width, "guidance_scale": guidance,
            "num_images_per_prompt": per_prompt}
    chosen = SamplerSettings(name=sampler, steps=steps, schedule=schedule, eta=eta)
    ours = torch.stack([r.latents for r in engine.generate(
        PROMPTS, seed=11, generation=engine.settings.generation.model_copy(update=size),
        sampler=chosen, loras=list(loras))])
    call = {"eta": DEFAULT_ETA[sampler] if eta is None else eta} if sampler in DEFAULT_ETA else {}
    theirs = pipeline_latents(engine, PROMPTS, seed=11,
                              scheduler=their_scheduler(engine, sampler, schedule),
                              num_inference_steps=steps, **size, **call)
    assert ours.shape == theirs.shape
    return ours, theirs


def test_every_sampler_is_written_out_here():
    assert set(DIFFUSERS) == set(SAMPLER_NAMES)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
@pytest.mark.parametrize(("height", "width", "guidance", "per_prompt"), [
    (32, 32, 7.5, 1),   # square, guided
    (32, 48, 1.0, 2),   # non-square, no unconditional pass, several images per prompt
    (48, 32, 7.5, 2),
])
def test_latents_equal_diffusers(engine, sampler, height, width, guidance, per_prompt):
    ours, theirs = both_latents(engine, sampler, height=height, width=width, guidance=guidance,
                                per_prompt=per_prompt)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize(("sampler", "schedule"), [
    (entry.name, schedule) for entry in SAMPLER_TABLE for schedule in entry.schedules
    if schedule != "default"])
def test_every_schedule_a_sampler_takes_equals_diffusers(engine, sampler, schedule):
    ours, theirs = both_latents(engine, sampler, schedule, per_prompt=2)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize(("sampler", "eta"), [
    ("tcd", 0.0), ("tcd", 0.3), ("tcd", 1.0), ("tcd", None), ("ddim", 0.5)])
def test_eta_equals_diffusers(engine, sampler, eta):
    ours, theirs = both_latents(engine, sampler, eta=eta, steps=4, per_prompt=2)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_eta_reaches_the_step(engine):
    """tcd at eta 0 is another picture than at its default 0.3 (the eta is not dropped)."""
    gamma_0, _ = both_latents(engine, "tcd", eta=0.0, steps=4)
    gamma_default, _ = both_latents(engine, "tcd", steps=4)
    assert (gamma_0 - gamma_default).abs().max().item() > 1e-2


def test_heun_reports_its_steps_and_its_unet_calls():
    """Heun's plan is 2n - 1 UNet calls for n steps: an image says n steps (A1111's `Steps`),
    its nfe and cost count every call, and progress counts calls from start to end."""
    events = []
    engine = Engine(tiny_settings("generation.guidance_scale=7.5"), on_event=events.append)
    result = engine.generate(PROMPTS[:1], seed=3,
                             sampler=SamplerSettings(name="heun", steps=5))[0]
    assert (result.steps, result.nfe, result.cost, result.decisions) == (5, 18, 9.0, "F" * 9)
    started = next(e for e in events if isinstance(e, BatchStarted))
    steps = [(e.step, e.total_steps) for e in events if isinstance(e, StepDone)]
    assert started.steps == 9 and steps == [(k, 9) for k in range(1, 10)]


# --------------------------------------------------------------------------- with a LoRA

LORAS = BUNDLED_DIR.parent / "loras"


@pytest.fixture(scope="module")
def shapes():
    return Engine(tiny_settings("model_id=bundled:shapes"))


@pytest.fixture(scope="module")
def unet_lora(tmp_path_factory):
    """The bundled ring LoRA's UNet part in diffusers' format, the part diffusers' pipeline
    loads itself (as tests/test_lora.py)."""
    source = LORAS / "ring_diffusers.safetensors"
    with safe_open(str(source), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    path = tmp_path_factory.mktemp("lora") / "ring_unet.safetensors"
    save_file({k: v for k, v in load_file(source).items() if k.startswith("unet.")}, str(path),
              metadata={"lora_adapter_metadata": json.dumps(
                  {k: v for k, v in metadata.items() if k.startswith("unet.")})})
    return path


@pytest.mark.parametrize("sampler", ["lcm", "tcd"])
def test_few_step_samplers_with_a_lora_equal_diffusers(shapes, unet_lora, sampler):
    """LCM / TCD as their LoRAs run: guidance 1, 4 steps, the LoRA fused here and loaded by
    diffusers' own pipeline (PEFT layers) there."""
    reference = Engine(shapes.settings)  # diffusers' adapter layers go into its own copy
    pipe = diffusers.StableDiffusionPipeline(
        vae=reference.vae, text_encoder=reference.text_encoder, tokenizer=reference.tokenizer,
        unet=reference.unet, scheduler=their_scheduler(reference, sampler),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(unet_lora), adapter_name="ring")
    pipe.set_adapters(["ring"], [0.8])
    size = {"height": 32, "width": 32, "guidance_scale": 1.0}
    theirs = pipe(PROMPTS, negative_prompt=[""] * 2, num_inference_steps=4, **size,
                  generator=[torch.Generator().manual_seed(11 + k) for k in range(2)],
                  output_type="latent", **({"eta": 0.3} if sampler == "tcd" else {})).images
    chosen = SamplerSettings(name=sampler, steps=4)
    results = shapes.generate(PROMPTS, seed=11, sampler=chosen, loras=[
        LoraEntry(path=unet_lora, weight=0.8)], generation=shapes.settings.generation
        .model_copy(update=size))
    ours = torch.stack([r.latents for r in results])
    base = torch.stack([r.latents for r in shapes.generate(
        PROMPTS, seed=11, sampler=chosen, loras=[],
        generation=shapes.settings.generation.model_copy(update=size))])
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - base).abs().max().item() > 1e-2  # the LoRA is in force


@pytest.mark.parametrize("sampler", ["ddpm", "dpm_solver++_sde", "tcd"])  # fresh noise a step
def test_image_regenerates_alone_from_its_seed(engine, tmp_path, sampler):
    """README's claim: image j of a batch, generated alone with its seed, has latents within
    1e-4 (batch size changes float rounding only) and identical 8-bit pixels in its file."""
    s = engine.settings
    chosen = SamplerSettings(name=sampler, steps=4)

    def generation(images: int):
        return s.generation.model_copy(update={"height": 32, "width": 32,
                                               "num_images_per_prompt": images})

    batch = engine.generate(["a red circle"], seed=100, generation=generation(3), sampler=chosen)
    alone = engine.generate(["a red circle"], seed=batch[2].seed, generation=generation(1),
                            sampler=chosen)[0]
    assert batch[2].seed == 102
    assert (alone.latents - batch[2].latents).abs().max().item() <= 1e-4
    saved = []
    for out, result in (("batch", batch[2]), ("alone", alone)):
        writes_to = s.model_copy(update={"io": s.io.model_copy(update={"out_dir": tmp_path / out})})
        with Image.open(RunWriter(writes_to, model_name="random:tiny").save(result)["path"]) as png:
            saved.append(np.asarray(png.convert("RGB")))
    assert np.array_equal(*saved)
