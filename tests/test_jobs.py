"""Prompts-file jobs in one process: parsing and its errors, indices and seeds, the manifest,
resume (skip what is done, adopt what a crash left unrecorded, refuse what is not ours)."""

import json
import os

import pytest
from helpers import TINY_FLAGS, tiny_settings
from typer.testing import CliRunner

from sdaccel.cli import app
from sdaccel.errors import ConfigError
from sdaccel.jobs import MANIFEST, check_sizes, read_jobs, read_manifest
from sdaccel.outputs import read_metadata

runner = CliRunner()


def generate(prompts_file, out, *args):
    result = runner.invoke(app, ["generate", "--prompts-file", str(prompts_file), *TINY_FLAGS,
                                 "--out-dir", str(out), "--json", *args])
    records = [json.loads(line) for line in result.stdout.splitlines()]
    return result, records


def snapshot(out):
    """name -> (inode, bytes) of every image in out."""
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in out.glob("img_*.png")}


def test_read_jobs_indices_seeds_and_overrides(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text('a red circle\n\n  \n{"prompt": "a blue square", "seed": 5, '
                    '"negative_prompt": "blurry", "height": 48, "guidance_scale": 1}\n'
                    "a green triangle\r\n")
    jobs = read_jobs(path, tiny_settings("generation.num_images_per_prompt=3"), "dark")
    assert [(j.index, j.line, j.prompt) for j in jobs] == [
        (0, 1, "a red circle"), (1, 4, "a blue square"), (2, 5, "a green triangle")]
    assert [j.seed for j in jobs] == [42, 5, 42 + 2 * 3]  # own seed, else seed + index * n
    assert [j.negative_prompt for j in jobs] == ["dark", "blurry", "dark"]
    assert (jobs[1].generation.height, jobs[1].generation.width) == (48, 32)
    assert jobs[1].generation.guidance_scale == 1
    assert jobs[0].generation.height == 32
    assert list(jobs[2].image_indices(3)) == [6, 7, 8]


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "x",}', ":2: not valid JSON"),
    ('{"prompt": "x", "steps": 3}', ":2: unknown key 'steps'; valid keys: prompt, "
                                    "negative_prompt, seed, height, width, guidance_scale"),
    ('{"seed": 3}', ":2: missing key 'prompt'"),
    ('{"prompt": "x", "seed": -1}', ":2: seed: must be an integer"),
    ('{"prompt": "x", "seed": "7"}', ":2: seed: must be an integer"),
    ('{"prompt": "x", "height": 38}', ":2: height: must be a multiple of 8, got 38 (nearest: 40)"),
    ('{"prompt": "x", "width": "32"}', ":2: width: Input should be a valid integer"),
    ('{"prompt": "x", "guidance_scale": -1}', ":2: guidance_scale: Input should be greater"),
    ('{"prompt": 3}', ":2: prompt: must be a string"),
    ('{"prompt": "  "}', ":2: prompt: must not be empty"),
])
def test_bad_lines_are_errors_naming_file_line_and_key(tmp_path, line, message):
    path = tmp_path / "jobs.jsonl"
    path.write_text(f"fine\n{line}\n")
    with pytest.raises(ConfigError) as info:
        read_jobs(path, tiny_settings())
    assert f"{path}{message}" in str(info.value)


def test_bom_and_the_model_size_check(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text('\ufeff{"prompt": "x", "width": 40}\nplain\n', encoding="utf-8")
    jobs = read_jobs(path, tiny_settings())
    assert [(j.prompt, j.generation.width) for j in jobs] == [("x", 40), ("plain", 32)]

    def needs_multiples_of_16(height, width):
        if width % 16:
            raise ConfigError(f"generation.width: {width} is not a multiple of 16")

    with pytest.raises(ConfigError, match=rf"^{path}:1: generation.width: 40 is not a multiple"):
        check_sizes(jobs, needs_multiples_of_16, path)


def test_missing_and_empty_prompts_files(tmp_path):
    with pytest.raises(ConfigError, match="prompts file .* does not exist"):
        read_jobs(tmp_path / "nope.txt", tiny_settings())
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ConfigError, match="no prompts"):
        read_jobs(tmp_path / "empty.txt", tiny_settings())


@pytest.mark.parametrize(("args", "message"), [
    ([], "no prompts: give them as arguments or --prompts-file FILE"),
    (["x", "--prompts-file", "p.txt"], "not both"),
])
def test_prompts_or_prompts_file(args, message):
    result = runner.invoke(app, ["generate", *args, *TINY_FLAGS])
    assert result.exit_code == 2 and message in result.stderr


def test_run_manifest_and_resume(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a red circle\n{"prompt": "a blue square", "seed": 100}\n')
    out = tmp_path / "out"
    result, records = generate(prompts, out, "--num-images", "2")
    assert result.exit_code == 0, result.output
    names = [f"img_00{k}_steps2.png" for k in range(4)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, MANIFEST])
    manifest = read_manifest(out)
    assert [r["index"] for r in manifest] == [0, 1, 2, 3]
    assert [r["file"] for r in manifest] == names
    assert [r["job"] for r in manifest] == [0, 0, 1, 1]
    assert [r["seed"] for r in manifest] == [42, 43, 100, 101]
    assert all(r["nfe"] == 4 and r["steps"] == 2 and r["seconds"] > 0 for r in manifest)
    assert sorted(r["index"] for r in records) == [0, 1, 2, 3]  # --json: the same records
    assert json.loads(read_metadata(out / names[2])["sdaccel"])["image"]["seed"] == 100

    before = snapshot(out)
    again, records = generate(prompts, out, "--num-images", "2")
    assert again.exit_code == 0, again.output
    assert records == [] and snapshot(out) == before  # nothing redone, nothing touched
    assert "4 of 4 image(s) already in" in again.stderr

    prompts.write_text(prompts.read_text() + "a green triangle\n")  # a job appended
    (out / names[1]).unlink()  # and an image deleted by hand: both are made
    third, records = generate(prompts, out, "--num-images", "2")
    assert third.exit_code == 0, third.output
    assert sorted(r["index"] for r in records) == [1, 4, 5]
    assert [r["index"] for r in read_manifest(out)] == [0, 1, 2, 3, 4, 5]
    assert [r["seed"] for r in read_manifest(out)][4:] == [46, 47]
    for name in (names[0], names[2], names[3]):
        assert snapshot(out)[name] == before[name]


def test_resume_adopts_what_a_crash_left_and_cleans_up(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n")
    out = tmp_path / "out"
    assert generate(prompts, out)[0].exit_code == 0
    complete = read_manifest(out)
    # The state a SIGKILL can leave: the last image saved but not recorded, a manifest line cut
    # short, a temporary file of an image being written.
    lines = (out / MANIFEST).read_text().splitlines(keepends=True)
    (out / MANIFEST).write_text("".join(lines[:1]))
    (out / "manifest.rank1.jsonl").write_text(lines[1] + lines[2][:20])
    (out / ".partial-abcd.tmp").write_bytes(b"\x89PNG half")
    before = snapshot(out)
    result, records = generate(prompts, out)
    assert result.exit_code == 0, result.output
    assert records == [] and snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, MANIFEST])
    adopted = read_manifest(out)
    assert adopted[2]["seconds"] is None  # rebuilt from the PNG's metadata
    for record in (*adopted, *complete):
        record.pop("seconds")
    assert adopted == complete


def test_changed_settings_or_foreign_files_are_errors(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    out = tmp_path / "out"
    assert generate(prompts, out)[0].exit_code == 0
    before = snapshot(out)

    result, _ = generate(prompts, out, "--seed", "7")
    assert result.exit_code == 2
    assert f"{out / MANIFEST}:1: image 0 was made with seed 42, but {prompts} line 1" in (
        result.stderr.replace("\n", ""))
    assert "another --out-dir" in result.stderr

    prompts.write_text("one\ntwo\nthree\n")  # a job appended, its name taken by a stranger
    (out / "img_002_steps2.png").write_bytes(b"not ours")
    (out / "img_009_steps5.png").write_bytes(b"not ours either")  # beyond the job list: ignored
    result, _ = generate(prompts, out)
    assert result.exit_code == 1
    assert f"{out / 'img_002_steps2.png'}: not recorded in" in result.stderr.replace("\n", "")
    assert (out / "img_002_steps2.png").read_bytes() == b"not ours"
    assert snapshot(out)["img_000_steps2.png"] == before["img_000_steps2.png"]
    assert "Traceback" not in result.output


def test_resume_with_another_schedule_or_eta_is_an_error(tmp_path):
    """Records name the schedule and eta; records made before either existed count as the
    sampler's own (DDIM: default schedule, eta 0), so old runs still resume."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\n")
    out = tmp_path / "out"
    assert generate(prompts, out, "--sampler", "ddim")[0].exit_code == 0
    for flags, key in ((["--schedule", "trailing"], "schedule"), (["--set", "sampler.eta=0.5"],
                                                                  "eta")):
        result, _ = generate(prompts, out, "--sampler", "ddim", *flags)
        assert result.exit_code == 2
        assert f"image 0 was made with {key}" in result.stderr.replace("\n", "")
    lines = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    (out / MANIFEST).write_text("".join(json.dumps({k: v for k, v in r.items()
                                                    if k not in ("schedule", "eta")}) + "\n"
                                        for r in lines))
    result, records = generate(prompts, out, "--sampler", "ddim")
    assert result.exit_code == 0 and records == []


def test_unrecorded_file_of_another_job_is_never_adopted(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\n")
    out = tmp_path / "out"
    assert runner.invoke(app, ["generate", "something else", *TINY_FLAGS, "--out-dir",
                               str(out)]).exit_code == 0  # img_000 from a plain run
    result, _ = generate(prompts, out)
    assert result.exit_code == 2
    assert "img_000_steps2.png (not in manifest.jsonl) was made with prompt 'something else'" in (
        result.stderr.replace("\n", ""))
    assert os.listdir(out) == ["img_000_steps2.png"]  # nothing written, nothing touched


def test_a_line_s_size_and_guidance_reach_its_image_and_metadata_only(tmp_path):
    """Per-job settings are handed to Engine.generate; the run's settings stay as resolved."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('{"prompt": "a red circle", "height": 48, "guidance_scale": 1}\n'
                       'a blue square\n')
    out = tmp_path / "out"
    result, records = generate(prompts, out)
    assert result.exit_code == 0, result.output
    first, second = sorted(records, key=lambda r: r["index"])
    assert (first["height"], first["guidance_scale"], first["nfe"]) == (48, 1.0, 2)
    assert (second["height"], second["guidance_scale"], second["nfe"]) == (32, 4.0, 4)
    from PIL import Image

    assert Image.open(out / first["file"]).size == (32, 48)
    saved = json.loads(read_metadata(out / first["file"])["sdaccel"])["settings"]["generation"]
    assert (saved["height"], saved["guidance_scale"]) == (48, 1.0)
    saved = json.loads(read_metadata(out / second["file"])["sdaccel"])["settings"]["generation"]
    assert (saved["height"], saved["guidance_scale"]) == (32, 4.0)


def write_png(path, size=(32, 32), color="red"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_init_image_mask_strength_and_hires_lines(tmp_path):
    """Paths are relative to the prompts file's folder; each file is read and hashed once."""
    write_png(tmp_path / "in" / "cat.png")
    write_png(tmp_path / "in" / "mask.png", size=(64, 48), color="white")  # resized: fine
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "a", "init_image": "in/cat.png", "strength": 0.5}\n'
        '{"prompt": "b", "init_image": "in/cat.png", "mask": "in/mask.png", "mask_blur": 8}\n'
        '{"prompt": "c", "init_image": "in/cat.png", "mask": "in/mask.png"}\n'
        '{"prompt": "d", "hires": true}\n'
        '{"prompt": "e", "hires": {"scale": 1.5, "upscaler": "lanczos", "steps": 3}}\n'
        'f\n')
    settings = tiny_settings("generation.strength=0.6", "hires.denoising_strength=0.4")
    a, b, c, d, e, f = read_jobs(path, settings, mask_blur=2)
    assert a.init_image.path == (tmp_path / "in" / "cat.png").resolve()
    assert a.init_image is b.init_image and a.mask is None
    assert (a.generation.strength, b.generation.strength) == (0.5, 0.6)
    assert (b.mask.path.name, b.mask_blur, c.mask_blur) == ("mask.png", 8, 2)
    assert d.hires.enabled and d.hires.denoising_strength == 0.4 and d.init_image is None
    assert (e.hires.enabled, e.hires.scale, e.hires.upscaler, e.hires.steps) == (
        True, 1.5, "lanczos", 3)
    assert e.hires.denoising_strength == 0.4  # the run's, under the line's keys
    assert f.hires is None and f.init_image is None and f.sources() == {}


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "x", "init_image": "nope.png"}', ":1: init_image: '{dir}/nope.png' does not "
                                                  "exist"),
    ('{"prompt": "x", "init_image": "notes.txt"}', ":1: init_image {dir}/notes.txt: not an "
                                                   "image"),
    ('{"prompt": "x", "init_image": "cut.png"}', ":1: init_image {dir}/cut.png: not a "
                                                 "readable image"),
    ('{"prompt": "x", "init_image": 3}', ":1: init_image: must be an image file's path"),
    ('{"prompt": "x", "init_image": "ok.png", "mask": "cut.png"}', ":1: mask {dir}/cut.png: "
                                                                  "not a readable image"),
    ('{"prompt": "x", "mask": "ok.png"}', ":1: mask: only with init_image"),
    ('{"prompt": "x", "strength": 0.5}', ":1: strength: only with init_image"),
    ('{"prompt": "x", "init_image": "ok.png", "mask_blur": 3}', ":1: mask_blur: only with mask"),
    ('{"prompt": "x", "init_image": "ok.png", "strength": 0}', ":1: strength: Input should be "
                                                              "greater than 0"),
    ('{"prompt": "x", "init_image": "ok.png", "strength": 1.5}', ":1: strength: Input should be "
                                                                "less than or equal to 1"),
    ('{"prompt": "x", "init_image": "ok.png", "mask": "ok.png", "mask_blur": -1}',
     ":1: mask_blur: must be an integer from 0 to 64"),
    ('{"prompt": "x", "hires": "yes"}', ":1: hires: must be true, false or an object"),
    ('{"prompt": "x", "hires": {"scale": 9}}', ":1: hires.scale: Input should be less than"),
    ('{"prompt": "x", "hires": {"upscaler": "esrgan"}}', ":1: hires.upscaler: Input should be"),
    ('{"prompt": "x", "hires": {"size": 2}}', ":1: hires.size: Extra inputs are not permitted"),
])
def test_bad_start_keys_are_errors_naming_file_line_and_key(tmp_path, line, message):
    write_png(tmp_path / "ok.png")
    (tmp_path / "notes.txt").write_text("not an image")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) - 30])
    path = tmp_path / "jobs.jsonl"
    path.write_text(f"{line}\n")
    with pytest.raises(ConfigError) as info:
        read_jobs(path, tiny_settings())
    assert f"{path}{message.format(dir=tmp_path)}" in str(info.value)


def test_start_fields_a_resumed_run_compares(tmp_path):
    """A record names the init image and mask (path and sha256), strength, mask blur and hires;
    records made before they existed read as text to image."""
    from sdaccel.jobs.manifest import expected_fields

    write_png(tmp_path / "cat.png")
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a", "init_image": "cat.png", "mask": "cat.png"}\n'
                    '{"prompt": "b", "hires": {"steps": 2}}\nc\n')
    settings = tiny_settings()
    a, b, c = read_jobs(path, settings)
    fields = expected_fields(a, 0, settings)
    assert fields["init_image"] == fields["mask"] == a.init_image.record()
    assert (fields["strength"], fields["mask_blur"], fields["hires"]) == (0.75, 4, None)
    assert expected_fields(b, 0, settings)["hires"]["steps"] == 2
    plain = expected_fields(c, 0, settings)
    keys = ("init_image", "strength", "mask", "mask_blur", "hires")
    assert [plain[k] for k in keys] == [None] * 5


def test_a_prompts_file_of_init_images_masks_and_hires_runs_and_resumes(tmp_path):
    write_png(tmp_path / "in" / "cat.png", color="blue")
    write_png(tmp_path / "in" / "mask.png", size=(16, 16), color="white")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "a red circle", "init_image": "in/cat.png", "strength": 0.5}\n'
        '{"prompt": "a red circle", "init_image": "in/cat.png", "mask": "in/mask.png"}\n'
        '{"prompt": "a blue square", "hires": {"scale": 2, "steps": 2}}\n'
        'a green triangle\n')
    out = tmp_path / "out"
    result, records = generate(prompts, out, "--mask-blur", "2")
    assert result.exit_code == 0, result.output
    a, b, c, d = read_manifest(out)
    cat = str((tmp_path / "in" / "cat.png").resolve())
    assert (a["init_image"]["path"], a["strength"], "mask" in a) == (cat, 0.5, False)
    assert (b["mask"]["path"].endswith("mask.png"), b["mask_blur"], b["strength"]) == (
        True, 2, 0.75)
    assert c["hires"]["scale"] == 2 and "init_image" not in c
    assert not {"init_image", "strength", "mask", "mask_blur", "hires"} & set(d)
    from PIL import Image

    assert Image.open(out / c["file"]).size == (64, 64)
    assert "Denoising strength: 0.5" in read_metadata(out / a["file"])["parameters"]

    before = snapshot(out)
    again, records = generate(prompts, out, "--mask-blur", "2")
    assert again.exit_code == 0, again.output
    assert records == [] and snapshot(out) == before  # nothing redone

    changed, _ = generate(prompts, out)  # another mask blur than the images were made with
    assert changed.exit_code == 2 and "image 1 was made with mask_blur 2" in (
        changed.stderr.replace("\n", ""))
    write_png(tmp_path / "in" / "cat.png", color="green")  # the init image edited
    changed, _ = generate(prompts, out, "--mask-blur", "2")
    assert changed.exit_code == 2
    message = changed.stderr.replace("\n", "")
    assert f"image 0 was made with init_image {cat} (sha256 " in message
    assert f"{prompts} line 1 with these settings asks for {cat} (sha256 " in message
    assert snapshot(out) == before  # nothing touched
