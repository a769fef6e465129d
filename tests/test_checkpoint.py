"""Single-file checkpoints in the original (LDM) layout, offline: written here from our models,
loaded back through diffusers' single-file conversion, safe `.ckpt` loading, clear errors."""

import hashlib
import os
import pickle

import pytest
import torch
from helpers import tiny_settings
from safetensors.torch import load_file, save_file

from sdaccel.engine.engine import Engine
from sdaccel.engine.loading.checkpoint import (
    BASE_KEY,
    architecture_problem,
    ldm_state_dict,
    model_hash,
    save_checkpoint,
)
from sdaccel.engine.loading.models import arch_dir, bundled_dir, load_components
from sdaccel.errors import ModelNotFoundError

PROMPT = "a red circle on a blue background"
ONLY_SD15 = "only Stable Diffusion 1.5 and SDXL (base) single-file checkpoints load"


@pytest.fixture(scope="module")
def shapes_file(tmp_path_factory):
    """bundled:shapes written as one LDM-layout .safetensors."""
    path = tmp_path_factory.mktemp("ckpt") / "shapes.safetensors"
    return save_checkpoint(load_components("bundled:shapes"), path)


def _latents(model: str, *overrides: str):
    engine = Engine(tiny_settings(f"model_id={model}", "generation.height=64",
                                  "generation.width=64", "sampler.name=dpm_solver++", *overrides))
    return engine, engine.generate([PROMPT], seed=3)[0].latents


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


def test_the_bundled_model_as_a_single_file_gives_the_folders_image(shapes_file):
    """The file holds the original key names; `--model shapes.safetensors` converts it with the
    bundled model's configs (recorded in the file's metadata) and gives the folder's latents;
    plain diffusers, `StableDiffusionPipeline.from_single_file(file, config=folder)`, gets the
    same image from the same file."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    state = load_file(shapes_file)
    assert "model.diffusion_model.input_blocks.0.0.weight" in state
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in state
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in state
    assert not any(k.startswith(("unet.", "vae.", "down_blocks.")) for k in state)

    folder_engine, folder = _latents("bundled:shapes")
    file_engine, single = _latents(str(shapes_file))
    assert (single - folder).abs().max() <= 1e-5
    for part in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(folder_engine.components, part),
                             getattr(file_engine.components, part)), part

    pipe = StableDiffusionPipeline.from_single_file(
        str(shapes_file), config=str(bundled_dir("shapes")), local_files_only=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, num_inference_steps=4, height=64, width=64,
                  guidance_scale=file_engine.settings.generation.guidance_scale,
                  generator=[torch.Generator().manual_seed(3)], output_type="latent").images
    assert (single - theirs[0]).abs().max() <= 1e-4


def test_fp16_file_loads_in_fp32(tmp_path):
    parts = load_components("bundled:shapes")
    path = save_checkpoint(parts, tmp_path / "shapes-fp16.safetensors", dtype=torch.float16)
    assert {t.dtype for t in load_file(path).values()} == {torch.float16, torch.int64}
    loaded = load_components(str(path))
    for name, p in loaded.unet.state_dict().items():
        assert p.dtype == torch.float32
        assert torch.equal(p, parts.unet.state_dict()[name].half().float()), name


@pytest.mark.parametrize("source", ["folder", "file"])
def test_parts_read_in_their_precision_are_the_fp32_weights_cast(shapes_file, source):
    """Read straight into bf16 / fp16 (no fp32 copy held beside them), from the bundled folder
    (whose UNet is stored in fp16) or its single file: the same weights as fp32 then a cast."""
    ref = "bundled:shapes" if source == "folder" else str(shapes_file)
    dtypes = {"unet": torch.bfloat16, "vae": torch.float16, "text_encoder": torch.bfloat16}
    fp32, direct = load_components(ref), load_components(ref, dtypes=dtypes)
    for part, dtype in dtypes.items():
        weights = getattr(direct, part).state_dict()
        assert {w.dtype for w in weights.values() if w.is_floating_point()} == {dtype}, part
        cast = getattr(fp32, part).to(dtype).state_dict()
        assert all(torch.equal(weights[k], cast[k]) for k in cast), part


def test_ckpt_is_loaded_weights_only(tmp_path, monkeypatch):
    parts = load_components("bundled:shapes")
    path = save_checkpoint(parts, tmp_path / "shapes.ckpt")
    assert set(torch.load(path, weights_only=True)) == {"state_dict", BASE_KEY}
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    loaded = load_components(str(path))
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert _same_weights(parts.unet, loaded.unet) and _same_weights(parts.vae, loaded.vae)


def test_ema_weights_beside_the_model_are_left_as_diffusers_leaves_them(shapes_file, tmp_path):
    """A checkpoint with both weights and their EMA (`model_ema.*`) loads the plain ones, as
    diffusers does by default; a pruned or EMA-only file has only model.diffusion_model.*."""
    state = load_file(shapes_file)
    unet_keys = [k for k in state if k.startswith("model.diffusion_model.")]
    for key in unet_keys:  # LDM's flat EMA names, with other values
        state["model_ema." + "".join(key.split(".")[1:])] = state[key] + 1.0
    path = tmp_path / "with-ema.safetensors"
    save_file(state, path, metadata={BASE_KEY: "bundled:shapes"})
    assert _same_weights(load_components("bundled:shapes").unet, load_components(str(path)).unet)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_ckpt_whose_pickle_runs_code_is_refused_and_nothing_runs(tmp_path, how):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4)},
               "x": RunsCode(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(ModelNotFoundError) as info:
        load_components(str(path))
    message = str(info.value)
    assert message.startswith(f"model {str(path)!r} refused: its pickle would run code (")
    assert "system" in message and "\n" not in message
    assert not marker.exists()


def test_the_cli_refuses_it_in_one_line_with_exit_3(tmp_path):
    from helpers import TINY_FLAGS
    from typer.testing import CliRunner

    from sdaccel.cli import app

    marker, path = tmp_path / "ran", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": RunsCode(marker)}, path)
    flags = [f for f in TINY_FLAGS if f != "random:tiny"]
    flags[flags.index("--model") + 1:flags.index("--model") + 1] = [str(path)]
    result = CliRunner().invoke(app, ["generate", "x", *flags, "--out-dir", str(tmp_path / "o")])
    assert result.exit_code == 3, result.output
    errors = [line for line in result.stderr.splitlines() if "refused" in line]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert errors[0].endswith(f"model {str(path)!r} refused: its pickle would run code "
                              "(posix.system); .ckpt files are only read weights-only "
                              "(torch.load(weights_only=True)), so nothing in it ran; use a "
                              ".safetensors copy from a source you trust")
    assert not marker.exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file_is_one_line(shapes_file, tmp_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": load_file(shapes_file)}, whole)
    else:
        whole.write_bytes(shapes_file.read_bytes())
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ModelNotFoundError) as info:
        load_components(str(cut))
    assert str(info.value).startswith(f"model {str(cut)!r} is truncated or corrupt")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("keys", "says"), [
    ({"conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight":
      (77, 768), "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)},
     "is an SDXL-layout checkpoint without both text encoders (no "
     "conditioner.embedders.1.model.*"),
    ({"cond_stage_model.model.token_embedding.weight": (8, 1024),
      "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
     "is an SD 2.x checkpoint"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)},
     "is an inpainting checkpoint (9 UNet input channels"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)},
     "is a LoRA file, not a full checkpoint"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3)},
     "is a UNet without its VAE (no first_stage_model.* keys)"),
])
def test_other_architectures_are_named(tmp_path, keys, says):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, path)
    with pytest.raises(ModelNotFoundError) as info:
        load_components(str(path))
    assert str(info.value).startswith(f"model {str(path)!r} {says}")
    assert str(info.value).endswith(ONLY_SD15)


def test_another_sd_shaped_model_without_its_configs_is_not_sd15(shapes_file, tmp_path):
    """The bundled model's file stripped of the metadata naming its configs: SD's layout, not
    SD 1.5's sizes, said in one line before any conversion."""
    path = tmp_path / "anonymous.safetensors"
    save_file(load_file(shapes_file), path)
    with pytest.raises(ModelNotFoundError) as info:
        load_components(str(path))
    assert str(info.value) == (
        f"model {str(path)!r} is not SD 1.5 (model.diffusion_model.input_blocks.0.0.weight is "
        f"(64, 4, 3, 3), SD 1.5's is (320, 4, 3, 3)); {ONLY_SD15}")


def _sd15_on_meta():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = arch_dir("sd15")
    with torch.device("meta"):
        return (UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")))


def test_sd15_written_here_has_the_released_key_names_and_shapes():
    """SD 1.5 written here (on meta tensors) carries the key names and shapes of SD 1.5's
    original checkpoints, one tensor per diffusers tensor (+ the text encoder's position_ids,
    as those files have), and passes the SD 1.5 check; 1024-dim cross-attention is SD 2.x."""
    unet, vae, text_encoder = _sd15_on_meta()
    ldm = ldm_state_dict(unet, vae, text_encoder)
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
    counts = [sum(k.startswith(p) for k in ldm) for p in prefixes]
    assert counts == [len(unet.state_dict()), len(vae.state_dict()),
                      len(text_encoder.state_dict()) + 1] == [686, 248, 197]
    assert len(ldm) == sum(counts) and architecture_problem(ldm) is None
    expected = {
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    }
    assert {k: tuple(ldm[k].shape) for k in expected} == expected
    k_v2 = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    assert "SD 2.x" in architecture_problem({**ldm, k_v2: torch.empty(640, 1024, device="meta")})


def test_model_hash_is_a1111s_autov2(shapes_file):
    digest = hashlib.sha256(shapes_file.read_bytes()).hexdigest()
    assert model_hash(shapes_file) == digest[:10]
    parts = load_components(str(shapes_file))
    assert parts.model_hash == digest[:10] and parts.source_file == str(shapes_file)
    assert load_components("bundled:shapes").model_hash is None


def test_model_hash_goes_before_model_in_the_parameters_line():
    from sdaccel.outputs import a1111_parameters

    line = a1111_parameters("p", "", 20, "Euler", 7.0, 1, 512, 512, "m.safetensors",
                            model_hash="0123456789").splitlines()[-1]
    assert line.endswith("Size: 512x512, Model hash: 0123456789, Model: m.safetensors")
    assert "Model hash" not in a1111_parameters("p", "", 20, "Euler", 7.0, 1, 512, 512, "m")


@pytest.mark.slow
def test_sd15_round_trip_gives_random_sd15s_image(tmp_path):
    """random:sd15 (SD 1.5's architecture, 1 GB of fp32 weights) written as an original-layout
    file loads back with SD 1.5's configs shipped here (no metadata needed: it is checked to be
    SD 1.5) and gives random:sd15's latents, both read with CLIP's tokenizer."""
    settings = ("generation.guidance_scale=7.5", "sampler.steps=2")
    direct_engine, direct = _latents("random:sd15", *settings)
    path = save_checkpoint(direct_engine.components, tmp_path / "sd15.safetensors")
    del direct_engine
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        assert BASE_KEY not in (handle.metadata() or {})
    file_engine, single = _latents(str(path), *settings)
    assert type(file_engine.tokenizer).__name__ == "CLIPTokenizer"
    assert len(file_engine.tokenizer) == 49408
    assert (single - direct).abs().max() <= 1e-5


def test_a_png_made_from_a_single_file_carries_its_model_hash(shapes_file, tmp_path):
    from typer.testing import CliRunner

    from sdaccel.cli import app
    from sdaccel.outputs import read_metadata

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["generate", "a red circle", "--model", str(shapes_file),
                                      "--steps", "2", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    parameters = read_metadata(out / "img_000_steps2.png")["parameters"]
    assert f"Model hash: {model_hash(shapes_file)}, Model: {shapes_file}" in parameters
