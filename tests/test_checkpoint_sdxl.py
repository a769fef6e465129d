"""SDXL single-file checkpoints in the original (SGM) layout, offline: written here from
random:sdxl-tiny, loaded back through diffusers' single-file conversion, the same image as the
diffusers folder and as diffusers' own `StableDiffusionXLPipeline.from_single_file`; SDXL's real
layout recognised; the refiner, SD 2.x, LoRAs and damaged files refused in one line."""

import hashlib

import pytest
import torch
from helpers import tiny_settings
from safetensors.torch import load_file, save_file

from sdaccel.engine.engine import Engine
from sdaccel.engine.loading import checkpoint
from sdaccel.engine.loading.checkpoint import (
    BASE_KEY,
    SUPPORTED,
    ldm_state_dict,
    recognise,
    save_checkpoint,
)
from sdaccel.engine.loading.models import arch_dir, load_components
from sdaccel.errors import ModelNotFoundError

PROMPT = "a red circle on a blue background"
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
CLIP_L, BIG_G = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."


@pytest.fixture(scope="module")
def tiny():
    return load_components("random:sdxl-tiny")


@pytest.fixture(scope="module")
def sdxl_file(tiny, tmp_path_factory):
    """random:sdxl-tiny written as one SGM-layout .safetensors."""
    return save_checkpoint(tiny, tmp_path_factory.mktemp("sdxl") / "sdxl-tiny.safetensors")


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


def _latents(model: str):
    engine = Engine(tiny_settings(f"model_id={model}", "generation.height=64",
                                  "generation.width=64", "generation.guidance_scale=5",
                                  "sampler.name=dpm_solver++"))
    return engine, engine.generate([PROMPT], seed=3)[0].latents


def _diffusers_folder(parts, folder):
    """random:sdxl-tiny as a diffusers folder (save_pretrained), the way users keep SDXL."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    StableDiffusionXLPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2,
        tokenizer=parts.tokenizer, tokenizer_2=parts.tokenizer_2, unet=parts.unet,
        scheduler=EulerDiscreteScheduler.from_config(parts.scheduler_config),
        add_watermarker=False).save_pretrained(folder)
    return folder


def _diffusers_from_single_file(path):
    """Plain diffusers on the file: `from_single_file` with the arch's config folder, offline.
    Given the whole file, diffusers 0.42 converts text_encoder_2 from the first embedder
    (CLIP ViT-L) whenever both encoders have the same width, as the tiny test model's do (32;
    SDXL's are 768 and 1280), and leaves its projection unloaded; so its second encoder is
    diffusers' own conversion of the file's OpenCLIP keys alone, passed in as diffusers' error
    message for a component it cannot load advises."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModelWithProjection

    config = str(arch_dir("sdxl-tiny"))
    big_g = {k: v for k, v in load_file(path).items() if k.startswith(BIG_G)}
    text_encoder_2 = create_diffusers_clip_model_from_ldm(
        CLIPTextModelWithProjection, big_g, config=config, subfolder="text_encoder_2",
        local_files_only=True)
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(path), config=config, local_files_only=True, text_encoder_2=text_encoder_2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_file_has_sdxls_original_layout(sdxl_file):
    state = load_file(sdxl_file)
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    assert CLIP_L + "text_model.final_layer_norm.weight" in state
    assert BIG_G + "transformer.resblocks.0.attn.in_proj_weight" in state
    assert BIG_G + "text_projection" in state and BIG_G + "positional_embedding" in state
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in state
    assert not any(k.startswith(("unet.", "text_encoder", "cond_stage_model.")) for k in state)
    assert recognise(state, sizes=False) == ("sdxl", None)


def test_single_file_is_the_folder_and_diffusers_from_single_file(tiny, sdxl_file, tmp_path):
    """random:sdxl-tiny, its diffusers folder and its single file give the same latents; so
    does plain diffusers' StableDiffusionXLPipeline.from_single_file on the file."""
    from diffusers import DPMSolverMultistepScheduler

    folder = _diffusers_folder(tiny, tmp_path / "sdxl-tiny")
    folder_engine, from_folder = _latents(str(folder))
    file_engine, single = _latents(str(sdxl_file))
    parts = file_engine.components
    assert parts.is_sdxl and parts.force_zeros_for_empty_prompt
    assert parts.source_file == str(sdxl_file)
    assert parts.model_hash == hashlib.sha256(sdxl_file.read_bytes()).hexdigest()[:10]
    assert parts.tokenizer_2.pad_token == "!" and parts.tokenizer.pad_token == "<|endoftext|>"
    for part in PARTS:
        assert _same_weights(getattr(tiny, part), getattr(folder_engine.components, part)), part
        assert _same_weights(getattr(tiny, part), getattr(parts, part)), part
    assert (single - from_folder).abs().max() <= 1e-5

    pipe = _diffusers_from_single_file(sdxl_file)
    for part in PARTS:
        assert _same_weights(getattr(tiny, part), getattr(pipe, part)), part
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++")
    theirs = pipe(PROMPT, num_inference_steps=4, height=64, width=64, guidance_scale=5.0,
                  generator=[torch.Generator().manual_seed(3)], output_type="latent").images
    assert (single - theirs[0]).abs().max() <= 1e-4


def test_fp16_file_and_parts_read_in_their_precision(tiny, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "sdxl-tiny-fp16.safetensors", dtype=torch.float16)
    assert {t.dtype for t in load_file(path).values()} == {torch.float16, torch.int64}
    loaded = load_components(str(path))
    for part in PARTS:
        ours = getattr(tiny, part).state_dict()
        for name, weight in getattr(loaded, part).state_dict().items():
            assert weight.dtype == torch.float32
            assert torch.equal(weight, ours[name].half().float()), (part, name)
    dtypes = {"unet": torch.float16, "vae": torch.float32, "text_encoder": torch.bfloat16}
    direct = load_components(str(path), dtypes=dtypes)
    for part, dtype in {**dtypes, "text_encoder_2": torch.bfloat16}.items():
        assert {w.dtype for w in getattr(direct, part).state_dict().values()} == {dtype}, part


def test_a_projection_saved_as_a_linear_weight_loads_the_same(tiny, sdxl_file, tmp_path):
    """Some tools save bigG's projection matrix as `text_projection.weight` (transposed, a
    linear layer's layout): the same text encoder loads from it."""
    state = load_file(sdxl_file)
    bare = "conditioner.embedders.1.model.text_projection"
    state[bare + ".weight"] = state.pop(bare).T.contiguous()
    path = tmp_path / "projection-as-weight.safetensors"
    save_file(state, str(path), metadata={BASE_KEY: "random:sdxl-tiny"})
    assert _same_weights(tiny.text_encoder_2, load_components(str(path)).text_encoder_2)


def test_ckpt_with_ema_weights_loads_the_plain_ones_weights_only(tiny, sdxl_file, tmp_path,
                                                                 monkeypatch):
    """A .ckpt ({"state_dict": ...}) holding the UNet's EMA beside it (`model_ema.*`, as an
    unpruned training checkpoint): read weights-only, the plain weights load, as diffusers."""
    state = load_file(sdxl_file)
    for key in [k for k in state if k.startswith("model.diffusion_model.")]:
        state["model_ema." + "".join(key.split(".")[1:])] = state[key] + 1.0
    path = tmp_path / "sdxl-tiny-ema.ckpt"
    torch.save({"state_dict": state, BASE_KEY: "random:sdxl-tiny"}, path)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    loaded = load_components(str(path))
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert all(_same_weights(getattr(tiny, part), getattr(loaded, part)) for part in PARTS)


def _sdxl_on_meta():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = arch_dir("sdxl")
    with torch.device("meta"):
        return (UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
                CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(
                    folder / "text_encoder_2")))


@pytest.fixture(scope="module")
def sdxl_layout():
    """SDXL 1.0 base's architecture (configs shipped in archs/sdxl) written here, on meta
    tensors (no memory)."""
    return ldm_state_dict(*_sdxl_on_meta())


def test_sdxl_written_here_has_the_released_key_names_and_shapes(sdxl_layout):
    """The real architecture's file: sd_xl_base_1.0's 2515 keys (UNet 1680, VAE 248, CLIP-L
    196 + position_ids, bigG 390 with logit_scale), its names and shapes; recognised as SDXL
    base here and as "xl_base" by diffusers."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    ldm = sdxl_layout
    prefixes = ("model.diffusion_model.", "first_stage_model.", CLIP_L, BIG_G)
    assert [sum(k.startswith(p) for k in ldm) for p in prefixes] == [1680, 248, 197, 390]
    assert len(ldm) == 2515
    assert recognise(ldm) == ("sdxl", None) and infer_diffusers_model_type(ldm) == "xl_base"
    expected = {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight":
            (1280, 2048),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        CLIP_L + "text_model.embeddings.position_ids": (1, 77),
        CLIP_L + "text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        BIG_G + "transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        BIG_G + "transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
        BIG_G + "text_projection": (1280, 1280),
        BIG_G + "positional_embedding": (77, 1280),
        BIG_G + "logit_scale": (),
    }
    assert {k: tuple(ldm[k].shape) for k in expected} == expected


def test_a_real_sdxl_file_converts_with_sdxls_configs_and_both_tokenizers(sdxl_layout, tiny,
                                                                          monkeypatch, tmp_path):
    """An SDXL base file (its layout, on meta tensors) converts with archs/sdxl, reads prompts
    with CLIP's tokenizer and OpenCLIP's (the same merges, padded with "!"), zeros for an empty
    negative prompt; the conversion is stood in for (SDXL's 2.6 B UNet in tests)."""
    seen = {}

    def convert(state, folder, ref, dtypes=None):
        seen["folder"] = folder
        return {part: getattr(tiny, part) for part in PARTS}

    monkeypatch.setattr(checkpoint, "read_checkpoint", lambda path, ref=None: (sdxl_layout, {}))
    monkeypatch.setattr(checkpoint, "convert_components", convert)
    path = tmp_path / "sd_xl_base_1.0.safetensors"
    path.touch()
    parts = load_components(str(path))
    assert seen["folder"] == arch_dir("sdxl")
    assert parts.is_sdxl and parts.force_zeros_for_empty_prompt
    assert parts.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    ids = [parts.tokenizer("a photo of a cat", padding="max_length").input_ids,
           parts.tokenizer_2("a photo of a cat", padding="max_length").input_ids]
    assert ids[0][:8] == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert ids[1][:8] == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    assert len(ids[0]) == len(ids[1]) == 77 and len(parts.tokenizer_2) == 49408


def _refiner(sdxl_file) -> dict:
    """The tiny file in the refiner's layout: OpenCLIP bigG as its only text encoder."""
    state = load_file(sdxl_file)
    return {k.replace(BIG_G, "conditioner.embedders.0.model."): v for k, v in state.items()
            if not k.startswith(CLIP_L)}


@pytest.mark.parametrize(("what", "says"), [
    ("refiner", "is an SDXL refiner checkpoint (one text encoder, OpenCLIP ViT-bigG "
                "conditioner.embedders.0.model.*), which is not supported"),
    ("sd2", "is an SD 2.x checkpoint (OpenCLIP text encoder cond_stage_model.model.*"),
    ("lora", "is an SDXL LoRA file, not a full checkpoint (load it with --lora)"),
    ("inpainting", "is an SDXL inpainting checkpoint (9 UNet input channels"),
    ("flux", "is a Flux checkpoint (double_blocks.*)"),
    ("anonymous", "is not SDXL base (model.diffusion_model.input_blocks.0.0.weight is "
                  "(32, 4, 3, 3), SDXL base's is (320, 4, 3, 3))"),
])
def test_what_does_not_load_is_one_line_naming_the_file(sdxl_file, tmp_path, what, says):
    """The refiner, SD 2.x, an SDXL LoRA given as the model, SDXL inpainting, another family,
    and the tiny file without the metadata naming its configs (SDXL's layout, not its sizes)."""
    state = load_file(sdxl_file)
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    states = {
        "refiner": lambda: _refiner(sdxl_file),
        "sd2": lambda: {"cond_stage_model.model.token_embedding.weight": torch.zeros(8, 1024),
                        conv_in: torch.zeros(320, 4, 3, 3)},
        "lora": lambda: {
            "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32)},
        "inpainting": lambda: {**state, conv_in: torch.zeros(32, 9, 3, 3)},
        "flux": lambda: {"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale":
                         torch.zeros(128)},
        "anonymous": lambda: state,
    }
    path = tmp_path / f"{what}.safetensors"
    save_file(states[what](), path)  # no metadata: what it is comes from its keys
    with pytest.raises(ModelNotFoundError) as info:
        load_components(str(path))
    assert str(info.value).startswith(f"model {str(path)!r} {says}")
    assert str(info.value).endswith(f"; {SUPPORTED}")
    assert "\n" not in str(info.value)


def test_metadata_naming_sdxl_on_an_sd15_file_is_one_line(tmp_path):
    parts = load_components("random:tiny")
    path = save_checkpoint(parts, tmp_path / "tiny.safetensors", base="random:sdxl-tiny")
    with pytest.raises(ModelNotFoundError) as info:
        load_components(str(path))
    assert str(info.value) == (f"model {str(path)!r}: its metadata says it was written from "
                               "random:sdxl-tiny, but it holds an SD 1.5 checkpoint")


def test_the_cli_refuses_a_refiner_in_one_line_with_exit_3_writing_nothing(sdxl_file, tmp_path):
    from typer.testing import CliRunner

    from sdaccel.cli import app

    path, out = tmp_path / "sd_xl_refiner.safetensors", tmp_path / "out"
    save_file(_refiner(sdxl_file), path)
    result = CliRunner().invoke(app, ["generate", "a lighthouse", "--model", str(path),
                                      "--height", "64", "--width", "64", "--steps", "2",
                                      "--out-dir", str(out)])
    assert result.exit_code == 3, result.output
    errors = [line for line in result.stderr.splitlines() if "not supported" in line]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert errors[0].endswith(f"model {str(path)!r} is an SDXL refiner checkpoint (one text "
                              "encoder, OpenCLIP ViT-bigG conditioner.embedders.0.model.*), "
                              f"which is not supported; {SUPPORTED}")
    assert not out.exists()


def test_a_v_prediction_file_samples_as_v_prediction(tiny, sdxl_file, tmp_path):
    """`v_pred` / `ztsnr` marker keys (NoobAI-XL V-Pred's, read by ComfyUI and Forge) switch the
    schedule to v-prediction with zero terminal SNR: the latents are diffusers' with those
    scheduler settings on the same weights."""
    from diffusers import DPMSolverMultistepScheduler

    state = load_file(sdxl_file)
    path = tmp_path / "vpred.safetensors"
    save_file({**state, "v_pred": torch.tensor([]), "ztsnr": torch.tensor([])}, path,
              metadata={BASE_KEY: "random:sdxl-tiny"})
    engine, mine = _latents(str(path))
    config = engine.components.scheduler_config
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"]
    pipe = _diffusers_from_single_file(sdxl_file)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", prediction_type="v_prediction",
        rescale_betas_zero_snr=True)
    theirs = pipe(PROMPT, num_inference_steps=4, height=64, width=64, guidance_scale=5.0,
                  generator=[torch.Generator().manual_seed(3)], output_type="latent").images
    assert (mine - theirs[0]).abs().max() <= 1e-4
