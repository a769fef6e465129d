"""The tiny decoder (loading/decoders.py): TAESD's own network against our key mapping, images
equal to diffusers' StableDiffusionPipeline with an AutoencoderTiny as its vae, the speed passes
and metadata with it, and every kind of file that is not SD 1.5's tiny decoder.

No TAESD weights can be downloaded here: a random-weight AutoencoderTiny with TAESD's config
(madebyollin/taesd's) is written in each layout users have."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny, StableDiffusionPipeline
from helpers import TINY, TINY_FLAGS, pipeline_latents
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from sdaccel.cli import app
from sdaccel.engine.engine import Engine
from sdaccel.engine.loading.decoders import (
    diffusers_to_taesd,
    read_tiny_decoder,
    taesd_to_diffusers,
)
from sdaccel.engine.loading.models import arch_dir, bundled_dir
from sdaccel.engine.sampling.samplers import build_scheduler
from sdaccel.events import Warning
from sdaccel.outputs import read_metadata
from sdaccel.settings import resolve_settings

runner = CliRunner()
SHAPES = ["--model", "bundled:shapes", "--steps", "3", "--seed", "5"]


def taesd_config(**changes):
    return {**json.loads((arch_dir("taesd") / "config.json").read_text()), **changes}


def random_taesd(seed: int = 1, **changes) -> AutoencoderTiny:
    torch.manual_seed(seed)
    return AutoencoderTiny.from_config(taesd_config(**changes)).eval()


def write_taesd_file(model: AutoencoderTiny, path):
    """TAESD's own decoder file (madebyollin/taesd's taesd_decoder.safetensors / .pth layout)."""
    state = {k: v.contiguous() for k, v in diffusers_to_taesd(model.decoder.state_dict()).items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    """One random TAESD in every layout: `.folder` (diffusers), `.file` (.safetensors), `.pth`."""
    root = tmp_path_factory.mktemp("taesd")
    model = random_taesd()
    model.save_pretrained(root / "taesd")
    return SimpleNamespace(model=model, folder=root / "taesd",
                           file=write_taesd_file(model, root / "taesd_decoder.safetensors"),
                           pth=write_taesd_file(model, root / "taesd_decoder.pth"))


# ---------------------------------------------------------------------------- key mapping

def _conv(n_in, n_out, **kwargs):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class _Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.conv = nn.Sequential(_conv(n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def original_taesd_decoder(latent_channels=4):
    """madebyollin/taesd's taesd.py Decoder, as its files were saved from (output in [0, 1])."""
    def stage():
        return [_Block(64), _Block(64), _Block(64), nn.Upsample(scale_factor=2),
                _conv(64, 64, bias=False)]
    return nn.Sequential(_Clamp(), _conv(latent_channels, 64), nn.ReLU(), *stage(), *stage(),
                         *stage(), _Block(64), _conv(64, 3))


def test_the_key_mapping_loads_taesds_own_network_and_back():
    model = random_taesd()
    original = original_taesd_decoder()
    original.load_state_dict(diffusers_to_taesd(model.decoder.state_dict()))  # strict
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():  # diffusers maps TAESD's [0, 1] to the VAE's [-1, 1]
        assert torch.allclose(original(latents) * 2 - 1, model.decode(latents).sample,
                              atol=1e-6)
    back = taesd_to_diffusers(original.state_dict())
    assert back.keys() == model.decoder.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.decoder.state_dict().items())


@pytest.mark.parametrize("layout", ["folder", "file", "pth"])
def test_every_layout_reads_the_same_weights(taesd, layout):
    tiny = read_tiny_decoder(str(getattr(taesd, layout)))
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(tiny.model.decode(latents).sample, taesd.model.decode(latents).sample)
    assert tiny.model.encoder is None  # TAESD's decoder files hold no encoder
    assert tiny.name == {"folder": "taesd", "file": "taesd_decoder.safetensors",
                         "pth": "taesd_decoder.pth"}[layout]


# ---------------------------------------------------------------------------- same image

def engine_with(taesd_path, *overrides, model=TINY, on_event=None):
    settings = resolve_settings("tiny", overrides=[*model, f"tiny_decoder={taesd_path}",
                                                   *overrides], environ={}).settings
    return Engine(settings, on_event=on_event or (lambda _e: None))


def diffusers_pipeline(engine, vae):
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=engine.text_encoder, tokenizer=engine.components.tokenizer,
        unet=engine.unet,
        scheduler=build_scheduler(engine.settings.sampler.name,
                                  engine.components.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_decode(pipe, latents):
    """The end of StableDiffusionPipeline.__call__: latents / scaling_factor, decode, PIL."""
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")


@pytest.mark.parametrize(("model", "layout"), [
    (TINY, "folder"), (TINY, "file"), (["model_id=bundled:shapes", "sampler.steps=4"], "file")])
def test_the_image_is_the_pipelines_with_autoencoder_tiny(taesd, model, layout):
    engine = engine_with(getattr(taesd, layout), model=model)
    prompts = ["a red circle", "a blue square"]
    results = engine.generate(prompts, seed=3)
    pipe = diffusers_pipeline(engine, AutoencoderTiny.from_pretrained(taesd.folder))
    ours = torch.stack([r.latents for r in results])
    # The latent grid is the pipeline's with this decoder (image / 8), and so are the latents.
    theirs = pipeline_latents(SimpleNamespace(settings=engine.settings,
                                              components=engine.components, vae=pipe.vae,
                                              text_encoder=engine.text_encoder,
                                              unet=engine.unet), prompts, seed=3)
    assert (ours - theirs).abs().max().item() <= 1e-4
    for result, expected in zip(results, pipeline_decode(pipe, ours), strict=True):
        assert result.image.size == (engine.settings.generation.width,
                                     engine.settings.generation.height)
        assert np.array_equal(np.asarray(result.image), np.asarray(expected))
    # Decoding with the model's VAE instead gives another picture: the decoder is in use.
    vae_image = pipeline_decode(diffusers_pipeline(engine, engine.vae), ours[:1])[0]
    assert vae_image.size != results[0].image.size or not np.array_equal(
        np.asarray(vae_image), np.asarray(results[0].image))


def test_a_decoder_made_for_another_upscaling_warns(taesd):
    events = []
    engine_with(taesd.file, model=["model_id=bundled:shapes"], on_event=events.append)
    warnings = [e.message for e in events if isinstance(e, Warning)]
    assert any("upscales latents 8x, the VAE of 'bundled:shapes' 4x" in w for w in warnings)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_speed_passes_keep_the_image(taesd, dtype):
    plain = engine_with(taesd.file, f"vae_dtype={dtype}").generate(["a red circle"])[0]
    events = []
    passes = ["optimize.channels_last=true", "optimize.prepack_weights=true",
              "optimize.fuse_qkv=true", "optimize.vae_tiling=true"]
    fast = engine_with(taesd.file, f"vae_dtype={dtype}", *passes, on_event=events.append)
    assert next(fast.decoder.parameters()).dtype == {"bf16": torch.bfloat16,
                                                     "fp32": torch.float32}[dtype]
    assert "vae_tiling" not in fast.passes and "prepack_weights" in fast.passes
    assert any("optimize.vae_tiling has no effect with tiny_decoder set" in e.message
               for e in events if isinstance(e, Warning))
    image = fast.generate(["a red circle"])[0].image
    difference = np.abs(np.asarray(image, np.int16) - np.asarray(plain.image, np.int16))
    assert difference.max() <= (1 if dtype == "fp32" else 3)


def test_compile_vae_compiles_the_tiny_decoder(taesd, monkeypatch):
    """compile.compile_vae hands torch.compile the decode that runs the tiny decoder (a real
    inductor compile is test_compile.py's; here torch.compile records what it was given)."""
    compiled, running = [], []

    def recording_compile(fn, **_options):
        def run(*args, **kwargs):  # records that a compiled callable is running
            running.append(fn)
            try:
                return fn(*args, **kwargs)
            finally:
                running.pop()
        compiled.append(fn)
        return run

    monkeypatch.setattr(torch, "compile", recording_compile)
    engine = engine_with(taesd.file, "compile.enabled=true", "compile.compile_vae=true")
    calls = []
    decode = engine.decoder.decode
    monkeypatch.setattr(engine.decoder, "decode",
                        lambda *a, **k: calls.append(list(running)) or decode(*a, **k))
    image = engine.generate(["a red circle"])[0].image
    # The tiny decoder ran once, inside the second callable handed to torch.compile.
    assert len(compiled) == 2 and calls == [[compiled[1]]]
    eager = engine_with(taesd.file).generate(["a red circle"])[0].image
    assert np.array_equal(np.asarray(image), np.asarray(eager))


# ---------------------------------------------------------------------------- front ends

def test_cli_records_the_decoder_and_the_png_regenerates_from_it(tmp_path, taesd):
    out = tmp_path / "out"
    made = runner.invoke(app, ["generate", "a red circle", *SHAPES, "--tiny-decoder",
                               str(taesd.file), "--out-dir", str(out)])
    assert made.exit_code == 0, made.output
    png = out / "img_000_steps3.png"
    chunks = read_metadata(png)
    record = json.loads(chunks["sdaccel"])
    sha256 = record["image"]["tiny_decoder"]["sha256"]
    assert record["image"]["tiny_decoder"] == {"path": str(taesd.file.absolute()),
                                               "name": "taesd_decoder.safetensors",
                                               "sha256": sha256}
    assert record["settings"]["tiny_decoder"] == str(taesd.file.resolve())
    # AUTOMATIC1111 names the VAE file and 10 hex of its sha256.
    assert f"VAE hash: {sha256[:10]}, VAE: taesd_decoder.safetensors" in chunks["parameters"]

    config = tmp_path / "from_png.yaml"
    config.write_text(json.dumps(record["settings"]))
    again = runner.invoke(app, ["generate", record["image"]["prompt"], "--config", str(config),
                                "--seed", "5", "--out-dir", str(tmp_path / "re")])
    assert again.exit_code == 0, again.output
    with Image.open(png) as a, Image.open(tmp_path / "re" / "img_000_steps3.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_without_a_tiny_decoder_nothing_is_recorded(tmp_path):
    made = runner.invoke(app, ["generate", "a red circle", *TINY_FLAGS, "--out-dir",
                               str(tmp_path)])
    assert made.exit_code == 0, made.output
    chunks = read_metadata(tmp_path / "img_000_steps2.png")
    assert "VAE" not in chunks["parameters"]
    record = json.loads(chunks["sdaccel"])
    assert "tiny_decoder" not in record["image"] and record["settings"]["tiny_decoder"] is None


def test_inspect_config_shows_the_decoder_and_its_source(taesd):
    shown = runner.invoke(app, ["inspect-config", "--json", "--tiny-decoder", str(taesd.file)])
    assert shown.exit_code == 0, shown.output
    as_json = json.loads(shown.stdout)
    assert as_json["settings"]["tiny_decoder"] == str(taesd.file)
    assert as_json["sources"]["tiny_decoder"] == "command-line flag"


def test_a_hub_id_loads_from_the_local_cache(taesd, tmp_path, monkeypatch):
    """madebyollin/taesd as huggingface_hub caches it: refs/main -> snapshots/<commit>/."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--taesd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (snapshot / name).write_bytes((taesd.folder / name).read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tiny = read_tiny_decoder("someone/taesd")
    assert tiny.name == "taesd" and tiny.weights.parent == snapshot
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(tiny.model.decode(latents).sample, taesd.model.decode(latents).sample)


# ---------------------------------------------------------------------------- bad input

class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, taesd):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "truncated.safetensors").write_bytes(taesd.file.read_bytes()[:-100])
    (folder / "garbage.pth").write_bytes(b"not a pickle or a zip")
    torch.save({"1.weight": _RunsCode()}, folder / "code.pth")
    # SDXL's TAESD: TAESD's network with other weights, under the name users download it by
    write_taesd_file(random_taesd(seed=2), folder / "taesdxl_decoder.safetensors")
    # taesd3 / taef1: the same network on 16 latent channels
    write_taesd_file(random_taesd(latent_channels=16), folder / "taef1_decoder.safetensors")
    encoder = random_taesd().encoder.state_dict()  # taesd_encoder.safetensors: "0.weight", ...
    save_file({k.removeprefix("layers."): v.contiguous() for k, v in encoder.items()},
              str(folder / "taesd_encoder.safetensors"))
    decoder = diffusers_to_taesd(random_taesd().decoder.state_dict())
    del decoder["19.bias"]
    save_file({k: v.contiguous() for k, v in decoder.items()}, str(folder / "short.safetensors"))
    vae = load_model_part("vae")
    save_file({k: v.contiguous() for k, v in vae.items()}, str(folder / "vae.safetensors"))
    unet = load_model_part("unet")
    save_file({k: v.contiguous() for k, v in unet.items()}, str(folder / "unet.safetensors"))
    (folder / "kl").mkdir()
    (folder / "kl" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    return folder


def load_model_part(part):
    from safetensors.torch import load_file

    return load_file(next((bundled_dir("shapes") / part).glob("*.safetensors")))


@pytest.mark.parametrize(("name", "message"), [
    ("missing.safetensors", "does not exist"),
    ("truncated.safetensors", "is not a readable .safetensors file (truncated or corrupt?)"),
    ("garbage.pth", "is not a readable PyTorch file"),
    ("code.pth", "loading it would run code"),
    ("taesdxl_decoder.safetensors", "is SDXL's TAESD (taesdxl)"),
    ("taef1_decoder.safetensors", "decodes 16-channel latents; model 'bundled:shapes' makes "
                                  "4-channel ones"),
    ("taesd_encoder.safetensors", "is a TAESD encoder"),
    ("short.safetensors", "does not fit TAESD's decoder (no layers.18.bias)"),
    ("vae.safetensors", "is a full VAE (AutoencoderKL), not a tiny decoder"),
    ("unet.safetensors", "is a UNet, not a tiny decoder"),
    ("lora", "is a LoRA file, not a tiny decoder"),
    ("kl", "is a AutoencoderKL folder (config.json), not an AutoencoderTiny"),
    ("model", "is a full model folder (model_index.json)"),
    ("someone/not-cached-taesd", "is not in the local Hugging Face cache"),
])
def test_a_bad_tiny_decoder_is_one_line_naming_it(tmp_path, bad_files, name, message):
    path = {"lora": bundled_dir("loras") / "ring.safetensors",
            "model": bundled_dir("shapes"),
            "someone/not-cached-taesd": "someone/not-cached-taesd"}.get(name, bad_files / name)
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", "a red circle", *SHAPES, "--tiny-decoder",
                                 str(path), "--out-dir", str(out)])
    assert result.exit_code == 3, result.output
    text = result.output.strip().splitlines()[-1]  # after the run's header line
    assert text.startswith("Error:") and "Error" not in result.output.replace(text, ""), text
    assert f"tiny_decoder {str(path)!r}" in text and message in text, text
    assert "this ran" not in result.output and not out.exists()


def test_an_empty_tiny_decoder_is_a_settings_error(tmp_path):
    result = runner.invoke(app, ["generate", "a red circle", *SHAPES, "--set", "tiny_decoder= ",
                                 "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "tiny_decoder" in result.output and not (tmp_path / "out").exists()
