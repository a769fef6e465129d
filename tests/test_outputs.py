"""File naming, no overwriting, metadata that A1111 readers and sdaccel can read back."""

import json
import re

from helpers import tiny_settings
from PIL import Image

from sdaccel.engine.engine import ImageResult
from sdaccel.outputs import RunWriter, next_index, png_metadata, read_metadata, save_image
from sdaccel.settings import GenerationSettings


def fake_result(seed=5, steps=4, prompt="a red circle", negative=""):
    """An image as the engine returns it, made at 32x32 with guidance 4 (tiny_settings')."""
    import torch

    return ImageResult(prompt=prompt, negative_prompt=negative, seed=seed, steps=steps, nfe=steps,
                       cost=float(steps), decisions="F" * steps,
                       image=Image.new("RGB", (32, 32), "red"), latents=torch.zeros(4, 16, 16),
                       seconds=0.5, generation=GenerationSettings(height=32, width=32,
                                                                   guidance_scale=4.0))


def test_index_continues_after_existing_files(tmp_path):
    (tmp_path / "img_000_steps10.png").write_bytes(b"")
    (tmp_path / "img_041_steps7.png").write_bytes(b"")
    (tmp_path / "img_5_steps7.png").write_bytes(b"")  # not our pattern: ignored
    (tmp_path / "notes.txt").write_text("x")
    assert next_index(tmp_path) == 42
    assert next_index(tmp_path / "missing") == 0


def test_never_overwrites_an_existing_name(tmp_path):
    existing = tmp_path / "img_003_steps4.png"
    existing.write_bytes(b"precious")
    index, path = save_image(tmp_path, 3, 4, Image.new("RGB", (8, 8)), png_metadata("p", {}))
    assert (index, path.name) == (4, "img_004_steps4.png")
    assert existing.read_bytes() == b"precious"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial")]


def test_metadata_round_trip(tmp_path):
    s = tiny_settings(f"io.out_dir={tmp_path}", "io.save_latents=true")
    writer = RunWriter(s, model_name="random:tiny")
    record = writer.save(fake_result(seed=9, negative="blurry"))
    assert record["path"].endswith("img_000_steps4.png")
    meta = read_metadata(record["path"])
    lines = meta["parameters"].splitlines()
    assert lines[0] == "a red circle"
    assert lines[1] == "Negative prompt: blurry"
    # The key: value layout A1111-compatible readers parse.
    fields = dict(re.findall(r"([A-Za-z ]+): ([^,]+)(?:, |$)", lines[2]))
    assert fields == {"Steps": "4", "Sampler": "DPM++ 2M", "CFG scale": "4", "Seed": "9",
                      "Size": "32x32", "Model": "random:tiny"}
    ours = json.loads(meta["sdaccel"])
    assert ours["settings"]["model_id"] == "random:tiny"
    assert ours["settings"]["sampler"]["steps"] == 4
    assert ours["image"]["seed"] == 9 and ours["image"]["negative_prompt"] == "blurry"
    from safetensors.torch import load_file

    assert load_file(record["latents_path"])["latents"].shape == (4, 16, 16)


def test_grid_holds_the_run(tmp_path):
    s = tiny_settings(f"io.out_dir={tmp_path}", "io.save_grid=true")
    writer = RunWriter(s, model_name="random:tiny")
    for seed in range(3):
        writer.save(fake_result(seed=seed))
    grid = writer.finish()
    assert grid.name == "grid_000-002.png"
    assert Image.open(grid).size == (64, 64)  # 2 x 2 cells of 32 px


def test_a_local_model_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    """The PNG's settings regenerate the image from any working directory: a model given as a
    relative folder (or file) path is recorded absolute."""
    import json
    import os

    from typer.testing import CliRunner

    from sdaccel.cli import app
    from sdaccel.outputs import read_metadata
    from sdaccel.shapes import BUNDLED_DIR

    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(BUNDLED_DIR, tmp_path)
    result = CliRunner().invoke(app, ["generate", "a red circle", "--model", relative,
                                      "--steps", "2", "--out-dir", "out"])
    assert result.exit_code == 0, result.output
    chunk = json.loads(read_metadata(tmp_path / "out" / "img_000_steps2.png")["sdaccel"])
    assert chunk["settings"]["model_id"] == str(BUNDLED_DIR.resolve())


def test_ti_hashes_list_the_embeddings_the_prompts_use_and_no_other():
    from sdaccel.outputs import a1111_parameters

    records = [{"token": t, "sha256": c * 64} for t, c in (("<cat-toy>", "a"), ("sks", "b"),
                                                             ("unused", "c"))]
    line = a1111_parameters("a (<Cat-Toy>:1.2) photo", "sks, blurry", 20, "Euler", 7.0, 1, 512,
                            512, "m", embeddings=records).splitlines()[-1]
    assert line.endswith(f'TI hashes: "<cat-toy>: {"a" * 12}, sks: {"b" * 12}"')
    assert "TI hashes" not in a1111_parameters("asks", "", 20, "Euler", 7.0, 1, 512, 512, "m",
                                               embeddings=records)


def started(result, **fields):
    """`result` with image-to-image fields (strength, mask_blur, hires) as the engine sets them."""
    from types import SimpleNamespace

    return SimpleNamespace(**{**vars(result), "strength": None, "mask_blur": None,
                              "hires": None, **fields})


def parameters_fields(parameters: str) -> dict[str, str]:
    return dict(re.findall(r"([A-Za-z ]+): ([^,]+)(?:, |$)", parameters.splitlines()[-1]))


def test_image_to_image_and_inpainting_metadata_as_a1111_writes_it(tmp_path):
    s = tiny_settings(f"io.out_dir={tmp_path}")
    writer = RunWriter(s, model_name="random:tiny")
    sources = {"init_image": {"path": "/a/cat.png", "sha256": "c" * 64},
               "mask": {"path": "/a/mask.png", "sha256": "d" * 64}}
    record = writer.save(started(fake_result(), strength=0.75, mask_blur=4), sources=sources)
    meta = read_metadata(record["path"])
    fields = parameters_fields(meta["parameters"])
    assert (fields["Denoising strength"], fields["Mask blur"]) == ("0.75", "4")
    assert meta["parameters"].splitlines()[-1].endswith(
        "Model: random:tiny, Denoising strength: 0.75, Mask blur: 4")
    assert not any(key.startswith("Hires") for key in fields)
    image = json.loads(meta["sdaccel"])["image"]
    assert image["init_image"] == sources["init_image"] and image["mask"] == sources["mask"]
    assert (image["strength"], image["mask_blur"]) == (0.75, 4)
    assert record["init_image"]["sha256"] == "c" * 64 and "hires" not in record

    plain = writer.save(started(fake_result(), strength=0.5),
                        sources={"init_image": sources["init_image"]})
    fields = parameters_fields(read_metadata(plain["path"])["parameters"])
    assert fields["Denoising strength"] == "0.5" and "Mask blur" not in fields
    assert "mask" not in plain and "mask_blur" not in plain


def test_hires_metadata_as_a1111_writes_it(tmp_path):
    from sdaccel.settings import HiresSettings

    s = tiny_settings(f"io.out_dir={tmp_path}")
    writer = RunWriter(s, model_name="random:tiny")
    for hires, expected in [
        (HiresSettings(enabled=True), "Denoising strength: 0.7, Hires upscale: 2, "
                                      "Hires upscaler: Latent"),
        (HiresSettings(enabled=True, scale=1.5, steps=10, upscaler="latent-nearest",
                       denoising_strength=0.55),
         "Denoising strength: 0.55, Hires upscale: 1.5, Hires steps: 10, "
         "Hires upscaler: Latent (nearest)"),
        (HiresSettings(enabled=True, upscaler="lanczos"), "Hires upscaler: Lanczos"),
    ]:
        record = writer.save(started(fake_result(), hires=hires))
        meta = read_metadata(record["path"])
        line = meta["parameters"].splitlines()[-1]
        assert line.endswith(expected), line
        assert "Size: 32x32" in line  # A1111's Size is the first pass's
        ours = json.loads(meta["sdaccel"])
        assert ours["image"]["hires"] == hires.model_dump(mode="json") == record["hires"]
        assert ours["settings"]["hires"] == hires.model_dump(mode="json")
        assert "strength" not in record and "init_image" not in record


def test_text_to_image_metadata_has_no_start_fields(tmp_path):
    s = tiny_settings(f"io.out_dir={tmp_path}", "hires.enabled=true")
    record = RunWriter(s, model_name="random:tiny").save(started(fake_result()))
    meta = read_metadata(record["path"])
    assert "Denoising" not in meta["parameters"] and "Hires" not in meta["parameters"]
    assert not {"strength", "mask_blur", "hires", "init_image", "mask"} & set(record)
    # the run's settings asked for the hires fix, but this image had no second pass
    assert json.loads(meta["sdaccel"])["settings"]["hires"]["enabled"] is False
