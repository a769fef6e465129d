"""LoRA (engine/lora/) on a real LoRA trained here: `bundled/loras/ring*.safetensors`
(python -m sdaccel.training.train_lora) teaches bundled:shapes a shape it never saw, a ring. It
works, at weight 0 it is the base image, its two file formats give one image, fused equals
unfused (and diffusers' own loading), switching returns exactly to the base weights and adds
no recompile; the CLI, prompts files and PNG metadata carry it; bad files are one line, exit 3."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from sdaccel.cli import app
from sdaccel.engine.engine import Engine
from sdaccel.engine.lora import LoraSwitcher, on_weights_changed, read_lora, trained_words
from sdaccel.engine.sampling.samplers import build_scheduler
from sdaccel.errors import LoraError
from sdaccel.outputs import read_metadata
from sdaccel.settings import LoraEntry, resolve_settings, split_lora
from sdaccel.shapes import BUNDLED_DIR, dataset, judge
from sdaccel.training.train_lora import ring_drawn

runner = CliRunner()
LORAS = BUNDLED_DIR.parent / "loras"
KOHYA = LORAS / "ring.safetensors"  # kohya / A1111 keys
DIFFUSERS = LORAS / "ring_diffusers.safetensors"  # diffusers / PEFT keys, with metadata
PROMPT = "a red ring on a blue background"
SHAPES = ["--model", "bundled:shapes", "--steps", "4"]


def settings(*overrides):
    return resolve_settings("tiny", overrides=list(overrides), environ={}).settings


def lora(path=KOHYA, weight=1.0):
    return LoraEntry(path=path, weight=weight)


@pytest.fixture(scope="module")
def engine():
    """bundled:shapes as the tiny preset has it (DPM-Solver++ 20 steps, guidance 4)."""
    return Engine(settings())


def weights(engine):
    return {**{f"unet.{k}": v.clone() for k, v in engine.unet.state_dict().items()},
            **{f"te.{k}": v.clone() for k, v in engine.text_encoder.state_dict().items()}}


def rings(results, colour="red", background="blue"):
    return [ring_drawn(r.image, colour, background) for r in results]


# --------------------------------------------------------------------------- the LoRA works


def test_the_trained_lora_draws_the_shape_the_model_cannot(engine):
    """Eight seeds of "a red ring on a blue background": with the LoRA at least six are red
    shapes with a hole showing the blue (judge.has_hole); without it none has a hole (the base
    model never saw the word). The known shapes stay about as right with it: on 12 held-out
    captions it loses at most two fully aligned images (measured: 11 without, 10 with)."""
    base = [engine.generate([PROMPT], seed=s, loras=[])[0] for s in range(8)]
    with_lora = [engine.generate([PROMPT], seed=s, loras=[lora()])[0] for s in range(8)]
    assert not any(judge.has_hole(r.image) for r in base)
    assert sum(rings(with_lora)) >= 6
    captions = dataset.held_out_captions()[::3][:12]

    def aligned(loras):
        return sum(judge.score(engine.generate([text], seed=k, loras=loras)[0].image, text)
                   .aligned for k, text in enumerate(captions))

    assert aligned([lora()]) >= aligned([]) - 2


def test_weight_zero_is_the_base_image_and_half_weight_is_between(engine):
    base = engine.generate([PROMPT], loras=[])[0]
    zero = engine.generate([PROMPT], loras=[lora(weight=0.0)])[0]
    assert torch.equal(zero.latents, base.latents)
    assert zero.loras[0]["weight"] == 0.0  # still recorded: the settings asked for it
    full = engine.generate([PROMPT], loras=[lora(weight=1.0)])[0]
    half = engine.generate([PROMPT], loras=[lora(weight=0.5)])[0]
    d_half, d_full = (float((r.latents - base.latents).abs().mean()) for r in (half, full))
    assert 0 < d_half < d_full


def test_both_file_formats_give_the_same_image(engine):
    """Same tensors, kohya keys with their alpha vs diffusers keys with diffusers' metadata
    (alpha 2 on rank 4: a loader that ignored either would double the LoRA's strength)."""
    a = engine.generate([PROMPT], loras=[lora(KOHYA, 0.8)])[0]
    b = engine.generate([PROMPT], loras=[lora(DIFFUSERS, 0.8)])[0]
    assert torch.allclose(a.latents, b.latents, atol=1e-5)
    assert a.loras[0]["sha256"] != b.loras[0]["sha256"]


def test_fused_unfused_and_diffusers_agree(engine, tmp_path):
    """Fused weights (the default) against the same file as active PEFT layers (unfused), and
    the UNet part against diffusers' own pipeline (load_lora_into_unet + set_adapters): fp32
    latents within the equivalence tolerance (1e-4)."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file

    fused = engine.generate([PROMPT], loras=[lora(weight=0.7)])[0]
    # another engine's models with the LoRA as active PEFT layers, put there by a switcher of
    # their own: the engine's own set stays empty, so it leaves them as they are
    plain = Engine(settings())
    LoraSwitcher({"unet": plain.unet, "text_encoder": plain.text_encoder},
                 plain.components.name, unfused=("unet", "text_encoder")).apply(
        [lora(weight=0.7)])
    unfused = plain.generate([PROMPT])[0]
    assert torch.allclose(fused.latents, unfused.latents, atol=1e-4)
    assert not torch.allclose(fused.latents, engine.generate([PROMPT], loras=[])[0].latents,
                              atol=1e-2)

    # diffusers loads the UNet part itself
    with safe_open(str(DIFFUSERS), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    unet_only = {k: v for k, v in load_file(DIFFUSERS).items() if k.startswith("unet.")}
    unet_file = tmp_path / "unet_only.safetensors"
    save_file(unet_only, str(unet_file), metadata={"lora_adapter_metadata": json.dumps(
        {k: v for k, v in metadata.items() if k.startswith("unet.")})})
    reference = Engine(settings())
    pipe = StableDiffusionPipeline(
        vae=reference.vae, text_encoder=reference.text_encoder, tokenizer=reference.tokenizer,
        unet=reference.unet, scheduler=build_scheduler(
            reference.settings.sampler.name, reference.components.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(unet_file), adapter_name="orange")
    pipe.set_adapters(["orange"], [0.7])
    expected = pipe([PROMPT], negative_prompt=[""], num_inference_steps=20, guidance_scale=4.0,
                    generator=[torch.Generator().manual_seed(42)], output_type="latent").images
    ours = engine.generate([PROMPT], loras=[lora(unet_file, 0.7)])[0]
    assert torch.allclose(ours.latents, expected[0].float(), atol=1e-4)


def test_a_kohya_text_encoder_part_with_attention_layers_only_is_applied(engine, tmp_path):
    """diffusers names such layers `to_k_lora` (not `.lora`): the part must not be dropped. The
    fused q_proj is W + weight * alpha / rank * up @ down."""
    from safetensors.torch import load_file

    tensors = {k: v for k, v in load_file(KOHYA).items()
               if k.startswith("lora_te_") and "_self_attn_" in k}
    path = tmp_path / "te_attention.safetensors"
    save_file(tensors, str(path))
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
    alpha = float(tensors[f"{name}.alpha"])
    q_proj = engine.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj")
    base = engine.generate([PROMPT], loras=[])[0]
    before = q_proj.weight.detach().clone()
    with_lora = engine.generate([PROMPT], loras=[lora(path, 0.8)])[0]
    expected = before + 0.8 * alpha / down.shape[0] * (up.float() @ down.float())
    assert torch.allclose(q_proj.weight.detach(), expected, atol=1e-6)
    assert not torch.allclose(with_lora.latents, base.latents, atol=1e-3)


def test_switching_returns_exactly_to_the_base_weights_and_images(engine):
    """A -> B -> none -> A: no reload, every weight back bit for bit, no drift."""
    base = engine.generate([PROMPT], loras=[])[0]
    original = weights(engine)  # (after the set of an earlier test is gone)
    a = engine.generate([PROMPT], loras=[lora(KOHYA, 1.0)])[0]
    b = engine.generate([PROMPT], loras=[lora(DIFFUSERS, -0.5), lora(KOHYA, 0.3)])[0]
    assert not torch.equal(a.latents, b.latents)
    none = engine.generate([PROMPT], loras=[])[0]
    assert torch.equal(none.latents, base.latents)
    now = weights(engine)
    assert all(torch.equal(original[k], now[k]) for k in original)
    again = engine.generate([PROMPT], loras=[lora(KOHYA, 1.0)])[0]
    assert torch.equal(again.latents, a.latents)
    unchanged = engine.lora.switches
    engine.generate([PROMPT], loras=[lora(KOHYA, 1.0)])  # the same set: nothing to do
    assert engine.lora.switches == unchanged
    engine.generate([PROMPT], loras=[])


def test_a_switch_under_compile_adds_no_recompile(monkeypatch):
    """torch.compile with a counting backend: the first call compiles the UNet once; switching
    LoRAs (fused, in place) then compiles nothing, and the compiled UNet sees the new weights."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")
    real = torch.compile

    def counted(fn, **options):
        return real(fn, backend=counter, fullgraph=options.get("fullgraph", False),
                    dynamic=options.get("dynamic", False))

    monkeypatch.setattr(torch, "compile", counted)
    compiled = Engine(settings("compile.enabled=true", "sampler.steps=4"))
    eager = Engine(settings("sampler.steps=4"))
    compiled.generate([PROMPT], loras=[])
    frames = counter.frame_count
    assert frames >= 1
    for loras in ([lora(KOHYA)], [lora(DIFFUSERS, 0.5)], []):
        got = compiled.generate([PROMPT], loras=loras)[0]
        want = eager.generate([PROMPT], loras=loras)[0]
        assert torch.allclose(got.latents, want.latents, atol=1e-5)
    assert counter.frame_count == frames  # no recompile


@pytest.mark.slow
def test_a_switch_under_a_real_inductor_compile_adds_no_graph():
    """A real inductor compile on the CPU (about a minute): LoRA switches compile no new graph
    and the compiled image is the eager one."""
    counters = torch._dynamo.utils.counters
    compiled = Engine(settings("compile.enabled=true", "compile.mode=default",
                               "sampler.steps=4"))
    compiled.generate([PROMPT], loras=[])
    graphs = counters["stats"]["unique_graphs"]
    got = compiled.generate([PROMPT], loras=[lora()])[0]
    compiled.generate([PROMPT], loras=[])
    assert counters["stats"]["unique_graphs"] == graphs
    want = Engine(settings("sampler.steps=4")).generate([PROMPT], loras=[lora()])[0]
    assert torch.allclose(got.latents, want.latents, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_a_switch_under_frozen_weights_compiles_again_and_follows_the_lora():
    """compile.freezing makes the weights constants of the compiled graph; those inductor
    pre-packs (convolutions; linear layers where oneDNN packs them, as bf16 on AMX) are copies
    that a switch in place does not reach. So every switch compiles the UNet again, and only a
    switch does."""
    counters = torch._dynamo.utils.counters
    frozen = Engine(settings("compile.enabled=true", "compile.mode=default",
                             "compile.freezing=true", "sampler.steps=4"))
    eager = Engine(settings("sampler.steps=4"))
    for call, loras in enumerate(([], [lora()], [lora()], [], [lora(KOHYA, 0.5)])):
        graphs = counters["stats"]["unique_graphs"]
        switches = frozen.lora.switches
        got = frozen.generate([PROMPT], loras=loras)[0]
        want = eager.generate([PROMPT], loras=loras)[0]
        assert torch.allclose(got.latents, want.latents, rtol=1e-3, atol=1e-3)
        switched = frozen.lora.switches != switches
        assert (counters["stats"]["unique_graphs"] > graphs) == (switched or call == 0)
    assert not frozen.compile_fell_back


def test_fused_qkv_projections_follow_the_lora(engine):
    fused_qkv = Engine(settings("optimize.fuse_qkv=true"))
    got = fused_qkv.generate([PROMPT], loras=[lora()])[0]
    want = engine.generate([PROMPT], loras=[lora()])[0]
    assert torch.allclose(got.latents, want.latents, atol=1e-4)
    base = fused_qkv.generate([PROMPT], loras=[])[0]
    assert torch.allclose(base.latents, engine.generate([PROMPT], loras=[])[0].latents,
                          atol=1e-4)


def test_a_switch_calls_the_hooks_registered_on_a_model_with_the_modules_it_rewrote():
    """How a speed pass keeps weights it derived from the model's (fuse_qkv's to_qkv) right: a
    hook registered on the model (lora.on_weights_changed) hears of every module whose weight
    a switch rewrote, putting the LoRA in and taking it out; a model without hooks, nothing."""
    fresh = Engine(settings())
    heard = []
    on_weights_changed(fresh.unet, lambda model, names: heard.append((model, set(names))))
    fresh.lora.apply([lora()])
    fresh.lora.apply([lora()])  # the set in force: nothing rewritten, nothing heard
    fresh.lora.apply([])
    [(model, put_in), (_, taken_out)] = heard
    assert model is fresh.unet and put_in == taken_out
    assert read_lora(KOHYA).modules["unet"] <= put_in <= dict(fresh.unet.named_modules()).keys()
    assert any(name.endswith(".attn1.to_q") for name in put_in)


def test_prepacked_weights_follow_the_lora(engine):
    """optimize.prepack_weights keeps a packed copy of each weight: a switch in place must reach
    it, and switching back must give the base image again; with the `cpu` preset's other
    passes (a fused QKV projection, channels-last convolutions) too."""
    packed = Engine(settings("optimize.prepack_weights=true", "optimize.fuse_qkv=true",
                             "optimize.channels_last=true"))
    for loras in ([lora()], [lora(DIFFUSERS, -0.5), lora(KOHYA, 0.3)], []):
        got = packed.generate([PROMPT], loras=loras)[0]
        want = engine.generate([PROMPT], loras=loras)[0]
        assert torch.allclose(got.latents, want.latents, atol=1e-4), loras


def test_int8_text_encoder_runs_the_lora_unfused(engine):
    """int8 (bitsandbytes) weights cannot take a delta exactly: the text encoder's LoRA runs as
    active PEFT layers there. Its prompt embedding is the fp32 encoder's with the LoRA, within
    README's int8 bound (2.5%), and no LoRA gives the int8 base image back exactly."""
    int8 = Engine(settings("text_encoder_dtype=int8"))
    assert int8.lora.unfused == {"text_encoder"}
    base = int8.generate([PROMPT], loras=[])[0]
    plain = int8.prompts.encode([PROMPT])
    int8.generate([PROMPT], loras=[lora()])
    engine.generate([PROMPT], loras=[lora()])
    with_lora, reference = int8.prompts.encode([PROMPT]), engine.prompts.encode([PROMPT])
    error = float((with_lora - reference).norm() / reference.norm())
    assert error < 0.025 < float((with_lora - plain).norm() / plain.norm())
    assert torch.equal(int8.generate([PROMPT], loras=[])[0].latents, base.latents)


# --------------------------------------------------------------------------- settings, CLI


@pytest.mark.parametrize(("text", "path", "weight"), [
    ("a.safetensors", "a.safetensors", 1.0),
    ("a.safetensors:0.5", "a.safetensors", 0.5),
    ("a.safetensors:-1", "a.safetensors", -1.0),
    ("C:\\loras\\a.safetensors", "C:\\loras\\a.safetensors", 1.0),
    ("C:\\loras\\a.safetensors:0.7", "C:\\loras\\a.safetensors", 0.7),
    ("name:2:1", "name:2", 1.0),
])
def test_file_and_weight(text, path, weight):
    assert split_lora(text) == (path, weight)


@pytest.mark.parametrize("text", ["a.safetensors:abc", "a.safetensors:", "a.safetensors:nan"])
def test_a_weight_that_is_not_a_number_names_the_file(text):
    with pytest.raises(LoraError, match="LoRA 'a.safetensors': weight .* is not a number"):
        split_lora(text)
    with pytest.raises(LoraError, match="is not a number"):
        LoraEntry.model_validate({"path": "a.safetensors", "weight": "abc"})


def test_flags_config_env_and_set_layer_the_list(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"loras:\n  - path: {KOHYA}\n    weight: 0.6\n")
    resolved = resolve_settings(config=config, environ={})
    assert resolved.settings.loras == [LoraEntry(path=KOHYA, weight=0.6)]
    assert resolved.sources["loras"] == str(config)
    flags = resolve_settings(config=config, flags={"loras": [f"{DIFFUSERS}:0.3"]}, environ={})
    assert flags.settings.loras == [LoraEntry(path=DIFFUSERS, weight=0.3)]  # replaces
    assert flags.sources["loras"] == "command-line flag"
    env = resolve_settings(environ={"SDACCEL_LORAS": json.dumps([f"{KOHYA}:2"])})
    assert env.settings.loras == [LoraEntry(path=KOHYA, weight=2.0)]
    assert resolve_settings(environ={}).settings.loras == []  # the seed's YAML: none


def test_inspect_config_shows_the_list_with_its_source():
    result = runner.invoke(app, ["inspect-config", "--lora", f"{KOHYA}:0.5",
                                 "--no-device-check"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("loras:"))
    assert line.endswith("# command-line flag") and "weight: 0.5" in line
    assert yaml.safe_load(line.split("  #")[0])["loras"] == [
        {"path": str(KOHYA), "weight": 0.5, "sha256": None}]


def test_generate_writes_a1111_lora_fields_and_regenerates_from_its_metadata(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", PROMPT, *SHAPES, "--lora", f"{KOHYA}:0.8",
                                 "--out-dir", str(out), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    meta = read_metadata(out / "img_000_steps4.png")
    data = KOHYA.read_bytes()
    autov3 = __import__("hashlib").sha256(
        data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    prompt_line, settings_line = meta["parameters"].splitlines()
    assert prompt_line == f"{PROMPT} <lora:ring:0.8>"
    assert settings_line.endswith(f'Lora hashes: "ring: {autov3}"')
    chunk = json.loads(meta["sdaccel"])
    sha = __import__("hashlib").sha256(data).hexdigest()
    assert chunk["settings"]["loras"] == [{"path": str(KOHYA), "weight": 0.8, "sha256": sha}]
    assert chunk["image"]["loras"][0]["sha256"] == sha == record["loras"][0]["sha256"]
    assert record["prompt"] == PROMPT

    # the chunk's settings alone, as a config file, make the same image again
    again = tmp_path / "again"
    config = tmp_path / "from_png.yaml"
    config.write_text(yaml.safe_dump({**chunk["settings"], "io": {"out_dir": str(again)}}))
    result = runner.invoke(app, ["generate", chunk["image"]["prompt"], "--config", str(config),
                                 "--seed", str(chunk["image"]["seed"])])
    assert result.exit_code == 0, result.output
    from PIL import Image

    with Image.open(out / "img_000_steps4.png") as first, \
            Image.open(again / "img_000_steps4.png") as second:
        assert first.tobytes() == second.tobytes()


def test_a_prompts_file_switches_loras_per_line_and_resumes(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"prompt": PROMPT, "loras": [f"{KOHYA}:1"]}),
        PROMPT,
        json.dumps({"prompt": PROMPT, "loras": [{"path": str(DIFFUSERS), "weight": 0.5}]}),
        json.dumps({"prompt": PROMPT, "loras": []}),
    ]) + "\n")
    out = tmp_path / "out"
    args = ["generate", "--prompts-file", str(prompts), *SHAPES, "--out-dir", str(out),
            "--json", "--lora", f"{KOHYA}:0.25"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    records = sorted((json.loads(x) for x in result.stdout.splitlines()),
                     key=lambda r: r["index"])
    assert [[(x["path"], x["weight"]) for x in r["loras"]] for r in records] == [
        [(str(KOHYA), 1.0)], [(str(KOHYA), 0.25)], [(str(DIFFUSERS), 0.5)], []]
    # each image is the one a plain generate with that LoRA makes
    engine = Engine(settings("sampler.steps=4"))
    for record, loras in zip(records, ([lora(KOHYA, 1.0)], [lora(KOHYA, 0.25)],
                                       [lora(DIFFUSERS, 0.5)], []), strict=True):
        want = engine.generate([PROMPT], seed=record["seed"], loras=loras)[0].image
        from PIL import Image

        with Image.open(out / record["file"]) as got:
            assert got.tobytes() == want.tobytes()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and again.stdout == ""  # resumed: nothing left to make
    changed = runner.invoke(app, [*args[:-1], f"{KOHYA}:0.5"])
    assert changed.exit_code == 2 and "was made with loras" in changed.stderr


# --------------------------------------------------------------------------- bad input


def sdxl_file(tmp_path, kind):
    """A tiny LoRA with SDXL's keys: kohya (lora_te1_/lora_te2_, input_blocks) or diffusers
    (text_encoder_2., and SDXL's 640-wide attention in down_blocks.1)."""
    r = 4
    if kind == "kohya":
        tensors = {
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight":
                torch.zeros(r, 640),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight":
                torch.zeros(640, r),
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
                torch.zeros(r, 1280),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight":
                torch.zeros(1280, r),
        }
    elif kind == "diffusers-te2":
        tensors = {
            "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
                torch.zeros(r, 1280),
            "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight":
                torch.zeros(1280, r),
        }
    else:  # SDXL's UNet widths, diffusers keys, no second text encoder: found by the shapes
        key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
        tensors = {f"{key}.lora_A.weight": torch.zeros(r, 640),
                   f"{key}.lora_B.weight": torch.zeros(640, r)}
    path = tmp_path / f"sdxl_{kind}.safetensors"
    save_file(tensors, str(path))
    return path


def truncated(tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(KOHYA.read_bytes()[:5000])
    return path


def garbage(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    return path


class _RunsAShell:
    def __reduce__(self):
        import os

        return (os.system, ("touch lora-pickle-ran",))


def pickle_with_code(tmp_path):
    """A .pt LoRA whose pickle calls os.system: torch blocks that module outright (another
    wording of its refusal than for builtins)."""
    path = tmp_path / "evil.pt"
    torch.save({"lora_unet_x.lora_down.weight": _RunsAShell()}, path)
    return path


def checkpoint_not_lora(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4)}, str(path))
    return path


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: sdxl_file(p, "kohya"), "is not for a Stable Diffusion 1.x model: it has weights "
     "for a second text encoder (SDXL)"),
    (lambda p: sdxl_file(p, "diffusers-te2"), "is not for a Stable Diffusion 1.x model"),
    (lambda p: sdxl_file(p, "unet"), "does not fit model bundled:shapes"),
    (truncated, "is not a readable .safetensors file (truncated or corrupt?)"),
    (garbage, "is not a readable .safetensors file"),
    (pickle_with_code, "holds more than tensors (posix.system): loading it would run code"),
    (checkpoint_not_lora, "is not a LoRA"),
    (lambda p: p / "missing.safetensors", "does not exist"),
    (lambda p: f"{KOHYA}:abc", "weight 'abc' is not a number"),
])
def test_bad_loras_are_one_line_exit_3_and_nothing_written(tmp_path, make, message):
    target = make(tmp_path)
    out = tmp_path / "o"
    result = runner.invoke(app, ["generate", PROMPT, *SHAPES, "--lora", str(target),
                                 "--out-dir", str(out)])
    assert result.exit_code == 3, result.output
    name = str(target).rpartition(":")[0] if str(target).endswith(":abc") else str(target)
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    error = next(x for x in lines if x.startswith("Error:"))
    assert message in error and name in error, error
    assert "Traceback" not in result.output and result.stdout == ""
    assert not out.exists() and not Path("lora-pickle-ran").exists()


def test_a_bad_lora_on_a_prompts_file_line_names_the_line(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(PROMPT + "\n" + json.dumps(
        {"prompt": PROMPT, "loras": [str(sdxl_file(tmp_path, "unet"))]}) + "\n")
    out = tmp_path / "o"
    result = runner.invoke(app, ["generate", "--prompts-file", str(prompts), *SHAPES,
                                 "--out-dir", str(out)])
    assert result.exit_code == 3, result.output
    assert f"{prompts}:2: LoRA file" in result.stderr and "does not fit" in result.stderr
    assert not list(out.glob("*.png"))


def test_a_changed_file_is_refused_when_the_settings_give_its_sha256(tmp_path):
    copy = tmp_path / "ring.safetensors"
    copy.write_bytes(KOHYA.read_bytes())
    sha = __import__("hashlib").sha256(copy.read_bytes()).hexdigest()
    engine = Engine(settings())
    engine.generate([PROMPT], loras=[LoraEntry(path=copy, sha256=sha)])
    copy.write_bytes(DIFFUSERS.read_bytes())
    with pytest.raises(LoraError, match="not the file the settings were made with"):
        Engine(settings(f"loras=[{{path: {copy}, sha256: {sha}}}]"))


def test_the_shipped_files_are_small_and_their_command_is_recorded():
    report = json.loads((LORAS / "ring.json").read_text())
    assert report["command"].startswith("python -m sdaccel.shapes.train_lora")
    for path in (KOHYA, DIFFUSERS):
        assert path.stat().st_size < 400_000
    assert report["eval"]["rings_with_lora"] >= 0.75 > 0 == report["eval"]["rings_without_lora"]
    assert math.isclose(report["config"]["alpha"] / report["config"]["rank"], 0.5)


def test_a1111_lora_tags_in_a_prompt_are_named_in_a_warning():
    from sdaccel.events import Warning

    events = []
    Engine(settings("sampler.steps=2"), on_event=events.append).generate(
        ["a red circle <lora:ring:0.8>"])
    warnings = [e.message for e in events if isinstance(e, Warning)]
    assert any(m.startswith("<lora:ring:0.8>: LoRA tags in a prompt") for m in warnings)


def test_the_unknown_word_warning_knows_the_words_a_lora_in_force_teaches(tmp_path):
    """The shipped files state "ring, rings" (ModelSpec's trigger phrase): with either in force
    "ring" is no unknown word; a LoRA whose file lists no words leaves the warning, hedged."""
    from safetensors.torch import load_file, save_file

    from sdaccel.events import Warning

    silent = tmp_path / "silent.safetensors"
    save_file(load_file(KOHYA), silent)  # the same LoRA, its metadata gone
    events = []
    engine = Engine(settings("sampler.steps=2"), on_event=events.append)

    def warnings(prompt, loras):
        events.clear()
        engine.generate([prompt], loras=loras)
        return [e.message for e in events if isinstance(e, Warning) and "never saw" in e.message]

    assert warnings(PROMPT, [lora(KOHYA)]) == []
    assert warnings(PROMPT, [lora(DIFFUSERS)]) == []
    [hedged] = warnings(PROMPT, [lora(silent)])
    assert hedged.startswith("bundled:shapes never saw the word(s) 'ring' (unless the LoRA "
                             "'silent' teaches them: its file lists no training words)")
    [plain] = warnings("two red rings", [])
    assert plain.startswith("bundled:shapes never saw the word(s) 'rings': it ignores them")


def test_the_trainer_writes_both_formats_stating_the_words_they_teach(tmp_path):
    """`train_lora --smoke` (seconds): the kohya and the diffusers file both load, and both
    carry the trigger phrase the unknown-word warning reads."""
    from sdaccel.training.train_lora import main

    main(["--out", str(tmp_path), "--smoke"])
    kohya, diffusers = (read_lora(tmp_path / f"ring{s}.safetensors") for s in ("", "_diffusers"))
    assert kohya.trained_words == diffusers.trained_words == {"ring", "rings"}


def test_trained_words_come_from_kohya_tags_and_the_modelspec_trigger_phrase():
    tags = json.dumps({"10_cats": {"a Cat, sitting": 3, "blue sky": 1}})
    assert trained_words({"ss_tag_frequency": tags}) == {"a", "cat", "sitting", "blue", "sky"}
    assert trained_words({"modelspec.trigger_phrase": "sks dog"}) == {"sks", "dog"}
    assert trained_words({"ss_tag_frequency": "not json", "ss_network_dim": "4"}) is None
    assert trained_words({}) is None


def test_loras_are_not_part_of_the_compile_cache_key():
    """Fused weights are the compiled graph's inputs, not constants: an entry warmed without
    LoRAs serves a run with them (test_a_switch_under_*: the graph and the images)."""
    from sdaccel.compile_cache import graph_hash

    assert graph_hash(settings()) == graph_hash(settings(f"loras=[{KOHYA}:0.5]"))
