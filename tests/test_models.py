"""Model references: random architectures, diffusers folders by path, clear errors."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from helpers import tiny_settings

from sdaccel.engine.engine import Engine
from sdaccel.engine.loading.models import arch_dir, load_components, parse_model_ref
from sdaccel.errors import ModelNotFoundError


@pytest.mark.parametrize(("ref", "kind"), [
    ("random:tiny", "random"),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "hub"),
    ("org/name@fp16", "hub"),
])
def test_reference_kinds(ref, kind):
    assert parse_model_ref(ref).kind == kind


def test_hub_revision_is_split():
    ref = parse_model_ref("org/name@v1.0")
    assert (ref.location, ref.revision) == ("org/name", "v1.0")


def _save(parts, folder):
    from diffusers import PNDMScheduler

    StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
        unet=parts.unet, scheduler=PNDMScheduler.from_config(parts.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)


def test_hub_revision_loads_that_revision_from_the_cache(tmp_path, monkeypatch):
    """`org/name@v1.0` loads what the local hub cache holds for v1.0, not main (offline: the
    cache's refs name each revision's snapshot); a revision it lacks is a clear error."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    parts = load_components("random:tiny")
    repo = tmp_path / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    for revision, commit, shift in (("main", "a" * 40, 0.0), ("v1.0", "b" * 40, 1.0)):
        with torch.no_grad():
            parts.unet.conv_in.bias += shift
        _save(parts, repo / "snapshots" / commit)
        (repo / "refs" / revision).write_text(commit)

    main, tagged = load_components("org/name"), load_components("org/name@v1.0")
    assert torch.equal(tagged.unet.conv_in.bias, main.unet.conv_in.bias + 1.0)
    assert torch.equal(tagged.unet.conv_out.weight, main.unet.conv_out.weight)
    assert tagged.name == "org/name@v1.0"
    with pytest.raises(ModelNotFoundError, match=r"'org/name@v2' is not in the local Hugging "
                       r"Face cache.*`hf download org/name --revision v2`"):
        load_components("org/name@v2")


@pytest.mark.parametrize(("ref", "message"), [
    ("random:sdxl-huge", "unknown random architecture; valid: random:tiny, random:sd15, "
                         "random:sdxl-tiny, random:sdxl"),
    ("bundled:nope", "no such bundled model"),
    ("missing.safetensors", "does not exist"),
    ("just-a-word", "is not an existing folder"),
    ("no-org/no-model", "not in the local Hugging Face cache"),
])
def test_bad_references_are_clear(ref, message):
    with pytest.raises(ModelNotFoundError, match=message):
        load_components(ref)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        parse_model_ref(str(tmp_path))


def test_random_weights_are_deterministic():
    a = load_components("random:tiny").unet.state_dict()
    b = load_components("random:tiny").unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sd15_is_the_real_architecture():
    """Parameter counts of SD 1.5's UNet, VAE and CLIP ViT-L/14 text encoder (built on meta)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = arch_dir("sd15")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))

    def millions(m):
        return round(sum(p.numel() for p in m.parameters()) / 1e6, 2)

    assert (millions(unet), millions(vae), millions(text)) == (859.52, 83.65, 123.06)


def test_folder_saved_by_diffusers_loads_by_path(tmp_path):
    """A user's diffusers folder, loaded by path, gives diffusers' own image for that folder."""
    from diffusers import DPMSolverMultistepScheduler

    parts = Engine(tiny_settings()).components
    folder = tmp_path / "my-model"
    _save(parts, folder)

    ours = Engine(tiny_settings(f"model_id={folder}", "sampler.name=dpm_solver++"))
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a red circle", num_inference_steps=4, height=32, width=32,
                  guidance_scale=ours.settings.generation.guidance_scale,
                  generator=[torch.Generator().manual_seed(3)], output_type="latent").images
    assert (ours.generate(["a red circle"], seed=3)[0].latents - theirs[0]).abs().max() <= 1e-4
