"""LoRA on SDXL (random:sdxl-tiny, 64x64): kohya files (`lora_unet_` with kohya's SDXL block
names, `lora_te1_`, `lora_te2_`, with their alphas) and diffusers files (`unet.`,
`text_encoder.`, `text_encoder_2.`) fused into the UNet and both text encoders give
StableDiffusionXLPipeline's latents with `load_lora_weights` + `fuse_lora` (fp32, max abs
<= 1e-4); switching them off gives the plain image back exactly; an SDXL LoRA on an SD 1.x
model and the reverse are one line naming the file and what it is, exit 3."""

import json

import pytest
import torch
from helpers import TINY_FLAGS, tiny_settings
from safetensors.torch import save_file
from typer.testing import CliRunner

from sdaccel.cli import app
from sdaccel.engine.engine import Engine
from sdaccel.engine.loading.models import load_components
from sdaccel.engine.lora import LoraSwitcher, model_is_sdxl, read_lora, read_loras
from sdaccel.engine.sampling.samplers import build_scheduler
from sdaccel.errors import LoraError
from sdaccel.outputs import read_metadata
from sdaccel.settings import LoraEntry
from sdaccel.shapes import BUNDLED_DIR

MODEL = "random:sdxl-tiny"
PROMPTS = ["a red circle on a blue background", "two green squares"]
SEED, STEPS, GUIDANCE = 5, 4, 5.0
RING = BUNDLED_DIR.parent / "loras" / "ring.safetensors"  # an SD 1.x LoRA (kohya, lora_te_)
runner = CliRunner()


def sdxl_settings(*overrides):
    return tiny_settings(f"model_id={MODEL}", "generation.height=64", "generation.width=64",
                         f"generation.guidance_scale={GUIDANCE}", "sampler.name=euler",
                         f"sampler.steps={STEPS}", *overrides)


@pytest.fixture(scope="module")
def engine():
    return Engine(sdxl_settings())


@pytest.fixture(scope="module")
def parts():
    """Another copy of the model, untouched by any switch: the one diffusers loads LoRAs in."""
    return load_components(MODEL)


def sgm_name(name: str, layers_per_block: int = 2) -> str:
    """A diffusers UNet attention module's name as kohya's SDXL trainer spells it (the
    original UNet's numbering: input_blocks.4.1...)."""
    parts = name.split(".")
    if parts[0] == "mid_block":
        return ".".join(["middle_block", "1", *parts[3:]])
    block, index = int(parts[1]), int(parts[3])
    first = {"down_blocks": 1 + block * (layers_per_block + 1),
             "up_blocks": block * (layers_per_block + 1)}[parts[0]] + index
    kind = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
    return ".".join([kind, str(first), "1", *parts[4:]])


def lora_file(path, parts, kind: str = "kohya", seed: int = 0, rank: int = 4):
    """A LoRA with random small weights on every linear layer of the UNet's attention blocks and
    of both text encoders' transformer layers: kohya's keys (alpha rank/2) or diffusers'."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}

    def add(key: str, module: torch.nn.Module, down: str, up: str) -> None:
        out_features, in_features = module.weight.shape
        tensors[f"{key}.{down}"] = torch.randn(rank, in_features, generator=generator) * 0.2
        tensors[f"{key}.{up}"] = torch.randn(out_features, rank, generator=generator) * 0.2
        if kind == "kohya":
            tensors[f"{key}.alpha"] = torch.tensor(rank / 2)

    factors = (("lora_down.weight", "lora_up.weight") if kind == "kohya"
               else ("lora_A.weight", "lora_B.weight"))
    for name, module in parts.unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attentions." in name:
            key = (f"lora_unet_{sgm_name(name).replace('.', '_')}" if kind == "kohya"
                   else f"unet.{name}")
            add(key, module, *factors)
    for prefix, encoder in (("te1", parts.text_encoder), ("te2", parts.text_encoder_2)):
        for name, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                name = name if name.startswith("text_model.") else f"text_model.{name}"
                key = (f"lora_{prefix}_{name.replace('.', '_')}" if kind == "kohya" else
                       f"text_encoder{'_2' if prefix == 'te2' else ''}.{name}")
                add(key, module, *factors)
    save_file(tensors, str(path))
    return path


def lora(path, weight: float = 1.0) -> LoraEntry:
    return LoraEntry(path=path, weight=weight)


def pipeline_latents(parts, loras=()):
    """StableDiffusionXLPipeline on a fresh copy of the model, each LoRA loaded by diffusers
    (load_lora_weights) and fused (fuse_lora)."""
    import diffusers

    copy = load_components(MODEL)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=copy.vae, text_encoder=copy.text_encoder, text_encoder_2=copy.text_encoder_2,
        tokenizer=copy.tokenizer, tokenizer_2=copy.tokenizer_2, unet=copy.unet,
        scheduler=build_scheduler("euler", copy.scheduler_config), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    for path in loras:
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    generators = [torch.Generator("cpu").manual_seed(SEED + k) for k in range(len(PROMPTS))]
    return pipe(PROMPTS, height=64, width=64, num_inference_steps=STEPS,
                guidance_scale=GUIDANCE, generator=generators, output_type="latent").images


def latents(engine, loras):
    return torch.stack([r.latents for r in engine.generate(PROMPTS, seed=SEED, loras=loras)])


def weights(engine):
    models = {"unet": engine.unet, "te": engine.text_encoder, "te2": engine.text_encoder_2}
    return {f"{name}.{k}": v.clone() for name, model in models.items()
            for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- fused, switched


@pytest.mark.parametrize("kind", ["kohya", "diffusers"])
def test_an_sdxl_lora_fused_gives_the_sdxl_pipelines_latents(engine, parts, tmp_path, kind):
    """The UNet and both text encoders take the file, as diffusers' SDXL loading does: the same
    latents, within the equivalence tolerance; and each part counts (the image moves)."""
    path = lora_file(tmp_path / f"{kind}.safetensors", parts, kind)
    read = read_lora(path)
    assert read.family == "sdxl" and set(read.modules) == {"unet", "text_encoder",
                                                           "text_encoder_2"}
    mine = latents(engine, [lora(path)])
    theirs = pipeline_latents(parts, [path])
    assert (mine - theirs).abs().max().item() <= 1e-4
    assert (mine - latents(engine, [])).abs().max().item() > 1e-2


def test_each_text_encoder_takes_its_part(engine, parts, tmp_path):
    """The second text encoder's weights are the original plus alpha/rank x up @ down, as the
    first's, read from kohya's lora_te2_ keys."""
    path = lora_file(tmp_path / "kohya.safetensors", parts)
    from safetensors.torch import load_file

    tensors = load_file(path)
    engine.generate(PROMPTS[:1], loras=[])
    for encoder, prefix in ((engine.text_encoder, "lora_te1"), (engine.text_encoder_2,
                                                               "lora_te2")):
        name = next(n for n, _ in encoder.named_modules() if n.endswith("layers.1.mlp.fc2"))
        key = f"{prefix}_text_model_{name.removeprefix('text_model.').replace('.', '_')}"
        before = encoder.get_submodule(name).weight.detach().clone()
        engine.generate(PROMPTS[:1], loras=[lora(path, 0.5)])
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        expected = before + 0.5 * float(tensors[f"{key}.alpha"]) / 4 * (up @ down)
        assert torch.allclose(encoder.get_submodule(name).weight, expected, atol=1e-6), prefix
        engine.generate(PROMPTS[:1], loras=[])


def test_switching_off_gives_the_plain_image_back_exactly(engine, parts, tmp_path):
    """plain -> A -> A and B -> none -> A: no reload, every weight of all three models back bit
    for bit, the plain latents exactly, A's again exactly."""
    a = lora_file(tmp_path / "a.safetensors", parts, "kohya", seed=1)
    b = lora_file(tmp_path / "b.safetensors", parts, "diffusers", seed=2)
    plain = latents(engine, [])
    original = weights(engine)
    with_a = latents(engine, [lora(a)])
    both = latents(engine, [lora(a, 0.5), lora(b, -0.3)])
    assert not torch.equal(with_a, both)
    assert torch.equal(latents(engine, []), plain)
    now = weights(engine)
    assert all(torch.equal(original[k], now[k]) for k in original)
    assert torch.equal(latents(engine, [lora(a)]), with_a)
    latents(engine, [])


def test_fused_and_unfused_agree_on_both_encoders(engine, parts, tmp_path):
    """The same file as active PEFT layers (unfused, as an int8 text encoder runs it) on another
    engine's three models: the fused engine's latents."""
    path = lora_file(tmp_path / "kohya.safetensors", parts, seed=3)
    fused = latents(engine, [lora(path, 0.7)])
    other = Engine(sdxl_settings())
    switcher = LoraSwitcher({"unet": other.unet, "text_encoder": other.text_encoder,
                             "text_encoder_2": other.text_encoder_2}, MODEL,
                            unfused=("unet", "text_encoder", "text_encoder_2"))
    switcher.apply([lora(path, 0.7)])
    assert (latents(other, []) - fused).abs().max().item() <= 1e-4
    latents(engine, [])


# --------------------------------------------------------------------------- bad input


def test_an_sdxl_lora_on_an_sd1_model_and_the_reverse_are_refused_before_loading(tmp_path,
                                                                                 parts):
    """read_loras with the model's reference tells the family from the reference alone (the
    shipped configs here): the engine's check before it loads the model."""
    sdxl = lora_file(tmp_path / "sdxl.safetensors", parts)
    with pytest.raises(LoraError, match=r"is not for a Stable Diffusion 1\.x model: it has "
                       r"weights for a second text encoder \(SDXL\) \(keys lora_te2_\.\.\.\), "
                       r"so it is an SDXL LoRA; model random:tiny is Stable Diffusion 1\.x"):
        read_loras([lora(sdxl)], "random:tiny")
    with pytest.raises(LoraError, match=r"is not for an SDXL model: it has kohya's names for a "
                       r"single text encoder \(keys lora_te_\.\.\.\), so it is a Stable "
                       r"Diffusion 1\.x/2\.x LoRA; model random:sdxl-tiny is SDXL"):
        read_loras([lora(RING)], MODEL)
    assert [f.family for f in read_loras([lora(sdxl)], MODEL)] == ["sdxl"]
    assert [f.family for f in read_loras([lora(RING)], "random:tiny")] == ["sd"]


def test_the_switcher_refuses_the_other_family_before_touching_a_weight(engine, tmp_path):
    before = weights(engine)
    with pytest.raises(LoraError, match="is not for an SDXL model"):
        engine.lora.apply([lora(RING)])
    now = weights(engine)
    assert all(torch.equal(before[k], now[k]) for k in before)


def test_the_family_is_told_by_the_cross_attention_width_where_keys_do_not(tmp_path):
    """A diffusers UNet-only file: SDXL's cross-attention reads 2048-wide text features, SD
    1.x's 768."""
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    for width, family in ((2048, "sdxl"), (768, "sd"), (64, None)):
        path = tmp_path / f"w{width}.safetensors"
        save_file({f"{key}.lora_A.weight": torch.zeros(4, width),
                   f"{key}.lora_B.weight": torch.zeros(640, 4)}, str(path))
        read = read_lora(path)
        assert (read.family, read.context_width) == (family, width)
    with pytest.raises(LoraError, match=r"weights that read 2048-wide text features \(SDXL\), so "
                       "it is an SDXL LoRA"):
        read_loras([lora(tmp_path / "w2048.safetensors")], "random:tiny")


def test_the_model_family_is_told_without_loading(tmp_path):
    folder = tmp_path / "xl"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"text_encoder_2": ["x", "y"]}))
    sdxl_file, sd_file = tmp_path / "xl.safetensors", tmp_path / "sd.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, str(sdxl_file))
    save_file({"cond_stage_model.transformer.x": torch.zeros(1)}, str(sd_file))
    assert [model_is_sdxl(ref) for ref in (MODEL, "random:tiny", str(folder), str(sdxl_file),
                                            str(sd_file), "random:nope", "no/such-model")] == [
        True, False, True, True, False, None, None]


def test_the_cli_refuses_either_way_in_one_line_exit_3(tmp_path, parts):
    sdxl = lora_file(tmp_path / "sdxl.safetensors", parts)
    cases = ((["--model", "random:tiny"], sdxl, "is not for a Stable Diffusion 1.x model"),
             (["--model", MODEL, "--height", "64", "--width", "64"], RING,
              "is not for an SDXL model"))
    for model, path, message in cases:
        out = tmp_path / "out"
        flags = [*TINY_FLAGS, *model]
        result = runner.invoke(app, ["generate", "a cat", *flags, "--lora", str(path),
                                     "--out-dir", str(out)])
        assert result.exit_code == 3, result.output
        error = [x for x in result.stderr.splitlines() if x.startswith("Error:")]
        assert len(error) == 1 and message in error[0] and str(path) in error[0], error
        assert "Traceback" not in result.output and not out.exists()


# --------------------------------------------------------------------------- front ends


def test_a_prompts_file_switches_sdxl_loras_per_line_and_resumes(tmp_path, parts):
    style = lora_file(tmp_path / "style.safetensors", parts)
    prompts = tmp_path / "prompts.txt"
    same = {"prompt": "a red circle", "seed": 9}
    prompts.write_text(json.dumps(same) + "\n"
                       + json.dumps({**same, "loras": [f"{style}:0.8"]}) + "\n")
    out = tmp_path / "out"
    flags = ["--prompts-file", str(prompts), *TINY_FLAGS, "--model", MODEL, "--height", "64",
             "--width", "64", "--out-dir", str(out), "--json"]
    result = runner.invoke(app, ["generate", *flags])
    assert result.exit_code == 0, result.output
    plain, styled = sorted(out.glob("img_*.png"))
    assert plain.read_bytes() != styled.read_bytes()  # the LoRA was in force on line 2 only
    recorded = json.loads(read_metadata(styled)["sdaccel"])["settings"]["loras"]
    assert [(entry["path"], entry["weight"]) for entry in recorded] == [(str(style), 0.8)]
    assert not json.loads(read_metadata(plain)["sdaccel"])["settings"]["loras"]
    again = runner.invoke(app, ["generate", *flags])
    assert again.exit_code == 0 and again.stdout == "", again.output  # nothing redone

    prompts.write_text(json.dumps({**same, "loras": [str(RING)]}) + "\n")
    refused = runner.invoke(app, ["generate", *flags[:-3], "--out-dir", str(tmp_path / "new")])
    assert refused.exit_code == 3 and "is not for an SDXL model" in refused.output, \
        refused.output
    assert f"{prompts}:1" in refused.output and not (tmp_path / "new").exists()


def test_serve_takes_sdxl_lora_tags_and_sdxl_embeddings_from_a_models_folder(tmp_path, parts):
    from fastapi.testclient import TestClient

    from sdaccel.serve.app import create_app
    from sdaccel.serve.models_dir import ModelsDir

    root = tmp_path / "models"
    (root / "loras").mkdir(parents=True)
    (root / "embeddings").mkdir()
    lora_file(root / "loras" / "style.safetensors", parts)
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 32)},
              str(root / "embeddings" / "glowing.safetensors"))
    save_file({"emb_params": torch.randn(1, 32)}, str(root / "embeddings" / "old.safetensors"))
    body = {"prompt": "a glowing circle", "steps": 2, "width": 64, "height": 64, "seed": 3}
    with TestClient(create_app(sdxl_settings(), models_dir=ModelsDir(root))) as client:
        listing = client.get("/sdapi/v1/embeddings").json()
        assert list(listing["loaded"]) == ["glowing"] and list(listing["skipped"]) == ["old"]
        plain = client.post("/sdapi/v1/txt2img", json=body).json()
        styled = client.post("/sdapi/v1/txt2img",
                             json={**body, "prompt": body["prompt"] + " <lora:style:0.8>"})
        assert styled.status_code == 200, styled.text
        assert styled.json()["images"][0] != plain["images"][0]
        assert "style" in json.loads(styled.json()["info"])["infotexts"][0]
