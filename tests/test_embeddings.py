"""Textual-inversion embeddings (engine/text/embeddings.py): files written here in the A1111 and
diffusers formats, checked against the words they copy, against diffusers' own loading of the
same files, through the CLI and the PNG metadata; and every kind of bad file."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import pipeline_latents
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from sdaccel.cli import app
from sdaccel.engine.engine import Engine
from sdaccel.engine.loading.models import load_components
from sdaccel.engine.sampling.samplers import build_scheduler
from sdaccel.events import Warning
from sdaccel.outputs import read_metadata
from sdaccel.settings import resolve_settings

runner = CliRunner()
SHAPES = ["--model", "bundled:shapes", "--steps", "3", "--seed", "5"]


@pytest.fixture(scope="module")
def vectors():
    """The bundled model's token-embedding rows of some of its words (128 values each)."""
    parts = load_components("bundled:shapes")
    table = parts.text_encoder.get_input_embeddings().weight.detach()
    ids = parts.tokenizer.convert_tokens_to_ids
    return {w: table[ids(f"{w}</w>")].clone() for w in ("red", "circle", "blue")}


def write(kind, folder, name, vecs):
    """An embedding file as each tool writes it; `vecs` is (n, dim)."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "diffusers":  # textual_inversion.py: {placeholder token: (n, dim)}
        path = folder / "learned_embeds.safetensors"
        save_file({name: vecs.contiguous()}, str(path))
    elif kind == "a1111-pt":  # A1111's Embedding.save
        path = folder / f"{name}.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vecs},
                    "name": name, "step": 0, "sd_checkpoint": None,
                    "sd_checkpoint_name": None}, path)
    else:  # "a1111-safetensors": civitai's layout
        path = folder / f"{name}.safetensors"
        save_file({"emb_params": vecs.contiguous()}, str(path))
    return path


def shapes_engine(*overrides, on_event=None):
    settings = resolve_settings("tiny", overrides=["sampler.steps=3", *overrides],
                                environ={}).settings
    return Engine(settings, on_event=on_event or (lambda _e: None))


def entry(path, token=None):
    return "embeddings=" + json.dumps([{"path": str(path), "token": token}])


# ---------------------------------------------------------------------------- it works


@pytest.mark.parametrize(("kind", "token"), [
    ("diffusers", "<crimson>"),  # the file's own token
    ("a1111-pt", "crimson"),  # A1111 names an embedding after its file
    ("a1111-safetensors", "crimson"),
])
def test_an_embedding_of_reds_vector_draws_red(tmp_path, vectors, kind, token):
    name = "<crimson>" if kind == "diffusers" else "crimson"
    path = write(kind, tmp_path, name, vectors["red"][None])
    events = []
    engine = shapes_engine(entry(path), on_event=events.append)
    ours = engine.generate([f"a {token} circle on a blue background"], seed=7)[0]
    red = engine.generate(["a red circle on a blue background"], seed=7)[0]
    assert torch.equal(ours.latents, red.latents)
    assert np.array_equal(np.asarray(ours.image), np.asarray(red.image))
    assert not [e for e in events if isinstance(e, Warning)]  # the token is no unknown word
    assert ours.embeddings[0]["token"] == token and len(ours.embeddings[0]["sha256"]) == 64


def test_a_multi_vector_embedding_matches_diffusers_loading_the_same_file(tmp_path, vectors):
    """Two vectors ('red', 'circle') under one token: the engine's latents are those of
    StableDiffusionPipeline after its own load_textual_inversion of the file, and the image
    is the one of the words it copies."""
    path = write("a1111-pt", tmp_path, "redcircle", torch.stack([vectors["red"],
                                                                   vectors["circle"]]))
    engine = shapes_engine(entry(path, token="<rc>"), "generation.guidance_scale=5")
    prompt = "a <rc> on a blue background"
    ours = torch.stack([r.latents for r in engine.generate([prompt], seed=3)])
    words = engine.generate(["a red circle on a blue background"], seed=3)[0]
    assert torch.equal(ours[0], words.latents)

    from diffusers import StableDiffusionPipeline

    parts = load_components("bundled:shapes")  # diffusers' own copy, loaded by diffusers
    StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
        unet=parts.unet, scheduler=build_scheduler("ddim", parts.scheduler_config),
        safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).load_textual_inversion(str(path), token="<rc>")
    theirs = pipeline_latents(SimpleNamespace(
        settings=engine.settings, components=parts, vae=parts.vae,
        text_encoder=parts.text_encoder, unet=parts.unet), [prompt], seed=3)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_cli_embeddings_reach_the_metadata_and_the_png_regenerates_from_it(tmp_path, vectors):
    first = write("diffusers", tmp_path / "crimson", "<crimson>", vectors["red"][None])
    second = write("a1111-safetensors", tmp_path, "azure", vectors["blue"][None])
    out = tmp_path / "out"
    made = runner.invoke(app, ["generate", "a <crimson> circle on a azure background", *SHAPES,
                               "--embedding", str(first.parent), "--embedding", str(second),
                               "--out-dir", str(out)])
    assert made.exit_code == 0, made.output
    png = out / "img_000_steps3.png"
    record = json.loads(read_metadata(png)["sdaccel"])
    listed = record["settings"]["embeddings"]
    assert [(e["path"], e["token"]) for e in listed] == [
        (str(first.resolve()), "<crimson>"), (str(second.resolve()), "azure")]
    assert all(len(e["sha256"]) == 64 for e in listed)
    # AUTOMATIC1111's readers (and civitai) find the embeddings by their 12-hex file hashes.
    settings_line = read_metadata(png)["parameters"].splitlines()[-1]
    crimson, azure = (e["sha256"][:12] for e in listed)
    assert settings_line.endswith(f'TI hashes: "<crimson>: {crimson}, azure: {azure}"')

    # From the metadata alone: its settings as a config file, its prompt and seed.
    config = tmp_path / "from_png.yaml"
    config.write_text(json.dumps(record["settings"]))
    image = record["image"]
    again = runner.invoke(app, ["generate", image["prompt"], "--config", str(config),
                                "--seed", str(image["seed"]), "--out-dir", str(tmp_path / "re")])
    assert again.exit_code == 0, again.output
    with Image.open(png) as a, Image.open(tmp_path / "re" / "img_000_steps3.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))

    # A different file under the recorded path is refused, by its sha256.
    write("diffusers", tmp_path / "crimson", "<crimson>", vectors["blue"][None])
    changed = runner.invoke(app, ["generate", image["prompt"], "--config", str(config),
                                  "--out-dir", str(tmp_path / "changed")])
    assert changed.exit_code == 3
    assert "has sha256" in changed.output and not (tmp_path / "changed").exists()


def test_a_settings_file_lists_embeddings_as_paths_or_entries(tmp_path, vectors):
    path = write("a1111-pt", tmp_path, "crimson", vectors["red"][None])
    config = tmp_path / "c.yaml"
    config.write_text(f"embeddings:\n  - {path}\n  - path: {path}\n    token: scarlet\n")
    made = runner.invoke(app, ["generate", "a scarlet crimson circle", *SHAPES, "--config",
                               str(config), "--out-dir", str(tmp_path / "out")])
    assert made.exit_code == 0, made.output
    listed = json.loads(read_metadata(tmp_path / "out" / "img_000_steps3.png")["sdaccel"])
    assert [e["token"] for e in listed["settings"]["embeddings"]] == ["crimson", "scarlet"]


# ---------------------------------------------------------------------------- bad input


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


def bad_files(folder, vectors):
    folder.mkdir()
    good = write("a1111-safetensors", folder, "good", vectors["red"][None])
    (folder / "truncated.safetensors").write_bytes(good.read_bytes()[:-40])
    (folder / "garbage.pt").write_bytes(b"not a pickle or a zip")
    torch.save({"string_to_param": {"*": _RunsCode()}}, folder / "code.pt")
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}}, folder / "sd15.pt")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)},
              str(folder / "sdxl.safetensors"))
    save_file({"a": torch.zeros(128), "b": torch.zeros(128)}, str(folder / "two.safetensors"))
    (folder / "notes.txt").write_text("x")
    return folder


@pytest.mark.parametrize(("name", "code", "message"), [
    ("missing.pt", 3, "embedding file '{}' does not exist"),
    ("truncated.safetensors", 3, "is not a readable .safetensors file"),
    ("garbage.pt", 3, "is not a readable PyTorch file"),
    ("code.pt", 3, "loading it would run code"),
    ("sd15.pt", 3, "has vectors of 768 values; the text encoder of 'bundled:shapes' takes 128"),
    ("sdxl.safetensors", 3, "is an SDXL embedding"),
    ("two.safetensors", 3, "is not a textual-inversion embedding"),
    ("notes.txt", 3, "unknown kind of file"),
])
def test_a_bad_embedding_file_is_one_line_naming_it(tmp_path, vectors, name, code, message):
    folder = bad_files(tmp_path / "files", vectors)
    path = folder / name
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", "a red circle", *SHAPES, "--embedding", str(path),
                                 "--out-dir", str(out)])
    assert result.exit_code == code, result.output
    text = result.output.strip().splitlines()[-1]  # after the run's header line
    assert text.startswith("Error:") and "Error" not in result.output.replace(text, ""), text
    assert str(path) in text and message.format(path) in text
    assert "this ran" not in result.output and not out.exists()


@pytest.mark.parametrize(("tokens", "message"), [
    (["x", "x"], "both use the token 'x'"),
    (["a</w>"], "is already in the tokenizer"),
])
def test_clashing_tokens_are_a_settings_error(tmp_path, vectors, tokens, message):
    paths = [write("a1111-pt", tmp_path / str(k), "e", vectors["red"][None])
             for k in range(len(tokens))]
    entries = [{"path": str(p), "token": t} for p, t in zip(paths, tokens, strict=True)]
    result = runner.invoke(app, ["generate", "a red circle", *SHAPES, "--set",
                                 "embeddings=" + json.dumps(entries),
                                 "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output, result.output


# ---------------------------------------------------------------------------- trained here


@pytest.mark.slow
def test_a_trained_embedding_draws_its_colour(tmp_path):
    """Textual inversion (sdaccel.training.train_embedding): a token learnt from images of red
    shapes alone draws red shapes, from both files it is saved as; the vector it started from
    (the mean of the colour words) draws no red."""
    from sdaccel.shapes import dataset, judge
    from sdaccel.training.train_embedding import save, train_embedding

    prompts = [f"a {{}} {shape} on a {background} background"
               for shape in dataset.SHAPES for background in ("green", "blue")]

    def colours(path, token):
        engine = shapes_engine(entry(path), "sampler.steps=20")
        return [judge.read(engine.generate([p.format(token)], seed=k)[0].image).colour
                for k, p in enumerate(prompts)]

    parts = load_components("bundled:shapes")
    table = parts.text_encoder.get_input_embeddings().weight.detach()
    start = table[parts.tokenizer.convert_tokens_to_ids([f"{c}</w>" for c in dataset.COLOURS])]
    started = colours(write("diffusers", tmp_path / "start", "<x>", start.mean(0)[None]), "<x>")

    diffusers_file, a1111_file = save(train_embedding("red", "<x>", steps=150), "<x>", tmp_path)
    trained = colours(diffusers_file, "<x>")
    assert trained.count("red") >= 7, trained
    assert started.count("red") <= 2, started
    assert colours(a1111_file, "learned") == trained  # A1111's file: its token is its stem
