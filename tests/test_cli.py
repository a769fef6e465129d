"""The CLI end to end: Typer's runner in process, and the installed `sdaccel` in a subprocess."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import TINY_FLAGS
from typer.testing import CliRunner

from sdaccel.cli import app
from sdaccel.outputs import read_metadata

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_help_does_not_import_torch():
    code = ("import sys; from sdaccel.cli import app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(app, ['generate', '--help']); "
            "assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_generate_json_and_files(tmp_path):
    out = tmp_path / "out"
    result = invoke("generate", "a red circle", "a blue square", *TINY_FLAGS, "--seed", "7",
                    "--num-images", "2", "--json", "--out-dir", str(out))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert [r["seed"] for r in records] == [7, 8, 9, 10]
    assert [r["prompt"] for r in records] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert sorted(p.name for p in out.iterdir()) == [f"img_00{k}_steps2.png" for k in range(4)]
    assert "saved" in result.stderr  # progress lines on stderr, never on stdout

    again = invoke("generate", "a red circle", *TINY_FLAGS, "--json", "--out-dir", str(out))
    assert json.loads(again.stdout)["path"].endswith("img_004_steps2.png")


def test_schedule_and_eta_reach_the_metadata_as_a1111_writes_them(tmp_path):
    result = invoke("generate", "a red circle", *TINY_FLAGS, "--sampler", "ddim", "--schedule",
                    "trailing", "--set", "sampler.eta=0.5", "--out-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    meta = read_metadata(tmp_path / "img_000_steps2.png")
    assert "Sampler: DDIM, Schedule type: SGM Uniform, CFG scale: " in meta["parameters"]
    assert meta["parameters"].splitlines()[-1].endswith("Model: random:tiny, Eta DDIM: 0.5")
    sampler = json.loads(meta["sdaccel"])["settings"]["sampler"]
    assert (sampler["schedule"], sampler["eta"]) == ("trailing", 0.5)


def test_a_schedule_the_sampler_cannot_take_is_exit_2_and_nothing_written(tmp_path):
    result = invoke("generate", "a red circle", *TINY_FLAGS, "--sampler", "tcd", "--schedule",
                    "karras", "--out-dir", str(tmp_path))
    assert result.exit_code == 2
    assert "sampler.schedule 'karras' is not available with sampler.name 'tcd'" in result.output
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_negative_prompt_and_set_reach_the_metadata(tmp_path):
    result = invoke("generate", "a red circle", *TINY_FLAGS, "--negative-prompt", "blurry",
                    "--set", "sampler.name=ddim", "--set", f"io.out_dir={tmp_path}")
    assert result.exit_code == 0, result.output
    meta = read_metadata(tmp_path / "img_000_steps2.png")
    assert "Negative prompt: blurry" in meta["parameters"]
    assert "Sampler: DDIM" in meta["parameters"]
    assert json.loads(meta["sdaccel"])["settings"]["sampler"]["name"] == "ddim"


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--set", "sampler.name=plms"], 2, "--set: sampler.name"),
    (["--config", "missing.yaml"], 2, "config file 'missing.yaml' does not exist"),
    (["--preset", "fast"], 2, "unknown preset 'fast'"),
    (["--height", "36"], 2, "generation.height: must be a multiple of 8, got 36"),
    (["--model", "no-such-org/no-such-model"], 3, "not in the local Hugging Face cache"),
    (["--model", "./missing-folder"], 3, "is not an existing folder"),
    (["--set", "device=cuda"], 4, "CUDA is not available"),
])
def test_user_errors_are_one_clear_line(tmp_path, monkeypatch, args, code, message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, anywhere
    result = invoke("generate", "x", *TINY_FLAGS, "--out-dir", str(tmp_path / "o"), *args)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert not (tmp_path / "o").exists()  # nothing written


def test_inspect_config_shows_sources():
    result = invoke("inspect-config", "--preset", "mix-bf16-int8", "--set", "sampler.steps=12",
                    "--no-device-check")
    assert result.exit_code == 0, result.output
    assert "steps: 12  # --set" in result.stdout
    assert "unet_dtype: bf16  # preset mix-bf16-int8" in result.stdout
    as_json = json.loads(invoke("inspect-config", "--json", "--steps", "3").stdout)
    assert as_json["settings"]["sampler"]["steps"] == 3
    assert as_json["sources"]["sampler.steps"] == "command-line flag"


def test_inspect_config_yaml_loads_back_as_a_config(tmp_path):
    shown = invoke("inspect-config", "--preset", "mix-bf16-int8-dpm10", "--no-device-check")
    path = tmp_path / "round.yaml"
    path.write_text(shown.stdout)
    again = invoke("inspect-config", "--config", str(path), "--json", "--no-device-check")
    first = invoke("inspect-config", "--preset", "mix-bf16-int8-dpm10", "--json",
                   "--no-device-check")
    assert json.loads(again.stdout)["settings"] == json.loads(first.stdout)["settings"]


def test_annotated_yaml_keeps_long_values_on_one_line_and_loads_back():
    import yaml

    from sdaccel.cli.inspect_config import annotated_yaml

    long_path = "/a/checkout/somewhere/deep/" * 6 + "ring.safetensors"
    values = {"loras": [{"path": long_path, "weight": 0.5}], "outer": {"prompt": "x " * 80}}
    shown = annotated_yaml(values, {"loras": "command-line flag"})
    assert len(shown.splitlines()) == 3  # loras, outer, outer.prompt
    assert shown.splitlines()[0].endswith("# command-line flag")
    assert yaml.safe_load(shown) == values


def test_inspect_config_bad_config_exits_nonzero(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampler:\n  name: plms\n")
    result = invoke("inspect-config", "--config", str(bad))
    assert result.exit_code == 2
    assert f"{bad}: sampler.name" in result.stderr


def test_inspect_config_checks_the_device(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, anywhere
    result = invoke("inspect-config", "--preset", "mix-bf16-int8")
    assert result.exit_code == 4 and "CUDA is not available" in result.stderr
    assert "unet_dtype: bf16  # preset mix-bf16-int8" in result.stdout  # shown all the same


def test_list_presets():
    result = invoke("inspect-config", "--list-presets")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == ["base", "cpu", "cpu-fast", "fp32-ddpm50", "mix-bf16-int8",
                     "mix-bf16-int8-compile", "mix-bf16-int8-dpm10", "sdxl", "sdxl-cpu", "tiny",
                     "tiny-fast", "tiny-lcm"]
    assert "sd15_mix_bf16_int8_ddpm50" in result.stdout


def test_installed_console_script(tmp_path):
    """The real `sdaccel` executable, as a user runs it."""
    exe = shutil.which("sdaccel", path=os.path.dirname(sys.executable))
    assert exe, "the console script is not installed next to this Python"
    proc = subprocess.run(
        [exe, "generate", "a red circle", *TINY_FLAGS, "--json", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert os.path.isfile(record["path"]) and record["steps"] == 2
    module = subprocess.run([sys.executable, "-m", "sdaccel", "--help"], capture_output=True,
                            text=True)
    assert module.returncode == 0 and "generate" in module.stdout


def test_interrupt_keeps_finished_images(tmp_path, monkeypatch):
    """Ctrl-C while the second prompt's batch runs (raised from its first UNet call, through
    the engine's UNet-wrapper seam): the first prompt's image stays, the exit code is 130."""
    from sdaccel import runs
    from sdaccel.engine.engine import Engine

    timesteps = []

    def interrupted_on_second_prompt(call):
        def unet(unet_input):
            timesteps.append(float(unet_input.timestep))
            if timesteps.count(timesteps[0]) == 2:  # the plan starts over: the second batch
                raise KeyboardInterrupt
            return call(unet_input)
        return unet

    def start_engine(settings, on_event, environ=None):
        return Engine(settings, on_event=on_event,
                      unet_wrappers=[interrupted_on_second_prompt]), []

    monkeypatch.setattr(runs, "start_engine", start_engine)
    result = invoke("generate", "one", "two", "three", *TINY_FLAGS, "--out-dir", str(tmp_path))
    assert result.exit_code == 130
    assert "Interrupted" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["img_000_steps2.png"]


def test_adaptive_decisions_reach_json_files_and_metadata(tmp_path):
    result = invoke("generate", "a red circle", *TINY_FLAGS, "--num-images", "2", "--json",
                    "--out-dir", str(tmp_path), "--set", "adaptive.enabled=true",
                    "--set", "adaptive.warmup_steps=2", "--set", "adaptive.min_steps=3",
                    "--set", "adaptive.max_steps=6")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    for record in records:
        plan = record["plan"]
        assert 3 <= record["steps"] == plan["total_steps"] <= 6
        assert record["path"].endswith(f"_steps{record['steps']}.png")
        assert record["nfe"] == 2 * record["steps"]
        parameters = read_metadata(record["path"])["parameters"]
        assert f"Steps: {record['steps']}," in parameters
        decision = f"pred_var {plan['score']:.3f} -> {record['steps']} of 6 steps"
        assert f"Adaptive steps: {decision}" in parameters
    assert "plan seed 42: pred_var" in result.stderr
    assert "adaptive: steps per image" in result.stderr


@pytest.mark.parametrize(("command", "excluded"), [
    (["generate"], ()), (["inspect-config"], ()), (["bench"], ("--out-dir",)),
    (["compile-cache", "warm"], ("--out-dir",)), (["compile-cache", "load"], ("--out-dir",)),
    (["serve"], ("--num-images",))])
def test_every_command_takes_every_settings_flag(command, excluded):
    """Declared once (cli/options.SHORTHAND): each command that reads settings offers every layer
    and every shorthand flag, under the same names, but the few it excludes by name."""
    from sdaccel.cli.options import SHORTHAND

    def long_name(alias) -> str:  # Typer keeps an Option's first name as its `default`
        info = alias.__metadata__[0]
        return next(n for n in (info.default, *info.param_decls) if n.startswith("--"))

    flags = [long_name(alias) for _, alias in SHORTHAND.values()]
    out = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--preset", "--config", "--set", *flags):
        assert (flag in out) != (flag in excluded), (command, flag)


def test_a_full_disk_is_one_line_and_keeps_the_images_already_saved(tmp_path, monkeypatch):
    import errno

    from PIL import Image

    save, calls = Image.Image.save, []

    def fills_up(image, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(image, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", fills_up)
    out = tmp_path / "out"
    result = invoke("generate", "a red circle", "a blue square", *TINY_FLAGS,
                    "--out-dir", str(out))
    assert result.exit_code == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"Error: cannot write {out / 'img_001_steps2.png'}: No space")
    assert "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["img_000_steps2.png"]  # no partial file


def test_images_are_readable_as_any_file_the_user_writes(tmp_path):
    """Written through a private temporary file, but given the umask's mode (not 0600)."""
    import os

    umask = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert invoke("generate", "a red circle", *TINY_FLAGS, "--out-dir", str(out)).exit_code == 0
    finally:
        os.umask(umask)
    assert (out / "img_000_steps2.png").stat().st_mode & 0o777 == 0o644


def test_a_prompts_file_run_whose_out_dir_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    result = invoke("generate", "--prompts-file", str(prompts), *TINY_FLAGS,
                    "--out-dir", str(blocker / "out"))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: cannot write {blocker / 'out'}: Not a directory")
    assert "Traceback" not in result.output
    assert blocker.read_text() == "keep me"


def test_out_dir_naming_a_file_is_an_error_before_anything_loads(tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    result = invoke("generate", "a red circle", *TINY_FLAGS, "--out-dir", str(existing))
    assert result.exit_code == 2
    assert f"io.out_dir: {str(existing)!r} is a file" in result.stderr
    assert existing.read_text() == "keep me"


def write_png(path, size=(32, 32), color="red"):
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return path


@pytest.mark.parametrize(("args", "message"), [
    (["--init-image", "{dir}/nope.png"], "--init-image: '{dir}/nope.png' does not exist"),
    (["--init-image", "{dir}/notes.txt"], "--init-image {dir}/notes.txt: not an image"),
    (["--init-image", "{dir}/cut.png"], "--init-image {dir}/cut.png: not a readable image"),
    (["--init-image", "{dir}/a.png", "--mask", "{dir}/cut.png"],
     "--mask {dir}/cut.png: not a readable image"),
    (["--mask", "{dir}/a.png"], "--mask needs --init-image"),
    (["--init-image", "{dir}/a.png", "--strength", "0"],
     "generation.strength: Input should be greater than 0"),
    (["--init-image", "{dir}/a.png", "--strength", "1.01"],
     "generation.strength: Input should be less than or equal to 1"),
    (["--init-image", "{dir}/a.png", "--init-image", "{dir}/a.png"],
     "2 --init-image for 3 prompts: give one image for every prompt"),
    (["--init-image", "{dir}/a.png", *["--mask", "{dir}/a.png"] * 2],
     "2 --mask for 1 --init-image"),
    (["--init-image", "{dir}/a.png", "--mask-blur", "2"], "--mask-blur: only with --mask"),
    (["--init-image", "{dir}/a.png", "--mask", "{dir}/a.png", "--mask-blur", "65"],
     "--mask-blur: must be from 0 to 64"),
    (["--hires-upscaler", "esrgan"], "hires.upscaler: Input should be 'latent', "),
    (["--hires", "--hires-scale", "1"], "hires.scale: Input should be greater than 1"),
    (["--set", "hires.steps=-1"], "hires.steps: Input should be greater than or equal to 0"),
])
def test_bad_init_images_masks_and_strengths_are_one_line_and_exit_2(tmp_path, args, message):
    write_png(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:-30])
    out = tmp_path / "o"
    result = invoke("generate", "x", "y", "z", *TINY_FLAGS, "--out-dir", str(out),
                    *[arg.format(dir=tmp_path) for arg in args])
    assert result.exit_code == 2, result.output
    assert message.format(dir=tmp_path) in result.stderr.replace("\n", "")
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert not out.exists()  # nothing written


def test_init_images_with_a_prompts_file_are_per_line(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("x\n")
    result = invoke("generate", "--prompts-file", str(prompts), "--init-image",
                    str(write_png(tmp_path / "a.png")), *TINY_FLAGS)
    assert result.exit_code == 2 and "give each line its own init_image" in result.stderr


def test_prompts_pair_with_init_images_and_masks(tmp_path):
    """One image for every prompt; one prompt for every image; as many of each: pairs. One
    mask serves every image, or one per image."""
    from helpers import tiny_settings

    from sdaccel.cli.generate import start_jobs

    a, b, m, n = (write_png(tmp_path / f"{name}.png") for name in "abmn")
    settings = tiny_settings()

    def pairs(prompts, images, masks=()):
        jobs = start_jobs(settings, prompts, "", images, list(masks), 4)
        return [(j.index, j.prompt, j.init_image.path.name,
                 j.mask and j.mask.path.name) for j in jobs]

    assert pairs(["x", "y"], [a]) == [(0, "x", "a.png", None), (1, "y", "a.png", None)]
    assert pairs(["x"], [a, b], [m]) == [(0, "x", "a.png", "m.png"), (1, "x", "b.png", "m.png")]
    assert pairs(["x", "y"], [a, b], [m, n]) == [(0, "x", "a.png", "m.png"),
                                                 (1, "y", "b.png", "n.png")]
    jobs = start_jobs(settings, ["x", "y"], "", [a, a], [], 4)
    assert jobs[0].init_image is jobs[1].init_image  # read once
    assert start_jobs(settings, ["x"], "", [], [], 4)[0].init_image is None


# The bundled model at its own 64x64, few steps: real pictures in seconds.
BUNDLED_FLAGS = ["--preset", "tiny", "--steps", "4"]


def test_image_to_image_and_inpainting_from_a_generated_png(tmp_path):
    import hashlib

    import numpy as np
    from PIL import Image

    out = tmp_path / "out"
    first = invoke("generate", "a red circle", *BUNDLED_FLAGS, "--out-dir", str(out), "--json")
    assert first.exit_code == 0, first.output
    source = out / "img_000_steps4.png"
    result = invoke("generate", "a blue square", *BUNDLED_FLAGS, "--init-image", str(source),
                    "--strength", "0.5", "--out-dir", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert "image to image at strength 0.5" in result.stderr
    record = json.loads(result.stdout)
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    assert record["init_image"] == {"path": str(source.resolve()), "sha256": sha}
    assert record["strength"] == 0.5 and "mask" not in record and record["steps"] == 4
    meta = read_metadata(record["path"])
    assert "Steps: 4," in meta["parameters"]  # the plan's steps, as A1111 writes them
    assert meta["parameters"].splitlines()[-1].endswith(", Denoising strength: 0.5")
    image = json.loads(meta["sdaccel"])["image"]
    assert image["init_image"]["sha256"] == sha and image["strength"] == 0.5

    mask = tmp_path / "mask.png"  # another size than the image: resized with it
    drawn = np.zeros((32, 32), np.uint8)
    drawn[:, 16:] = 255  # redraw the right half
    Image.fromarray(drawn).save(mask)
    result = invoke("generate", "a blue square", *BUNDLED_FLAGS, "--init-image", str(source),
                    "--mask", str(mask), "--out-dir", str(out), "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["mask"]["path"] == str(mask.resolve()) and record["mask_blur"] == 4
    assert record["strength"] == 0.75  # generation.strength's default
    assert read_metadata(record["path"])["parameters"].splitlines()[-1].endswith(
        ", Denoising strength: 0.75, Mask blur: 4")
    before, after = (np.asarray(Image.open(p), dtype=float) for p in (source, record["path"]))
    kept, redrawn = (np.abs(after - before)[:, cols].mean() for cols in (slice(0, 24),
                                                                          slice(40, 64)))
    assert kept < redrawn  # the black half is kept, the white half drawn again


def test_hires_fix_with_scale_2(tmp_path):
    result = invoke("generate", "a red circle", *BUNDLED_FLAGS, "--hires", "--hires-scale", "2",
                    "--hires-steps", "2", "--out-dir", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    assert "hires fix x2 (latent)" in result.stderr
    record = json.loads(result.stdout)
    from PIL import Image

    assert Image.open(record["path"]).size == (128, 128)
    assert record["hires"]["scale"] == 2 and record["hires"]["steps"] == 2
    line = read_metadata(record["path"])["parameters"].splitlines()[-1]
    assert "Size: 64x64," in line  # A1111 writes the first pass's size
    assert line.endswith(", Denoising strength: 0.7, Hires upscale: 2, Hires steps: 2, "
                         "Hires upscaler: Latent")
