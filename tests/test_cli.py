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
                     "mix-bf16-int8-compile", "mix-bf16-int8-dpm10", "tiny", "tiny-fast",
                     "tiny-lcm"]
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
