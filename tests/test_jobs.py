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
