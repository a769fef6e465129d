"""sdaccel.runs, what every front end shares: jobs with their image indices and seeds (the plain
run's and a prompts file's alike), the loop that runs them through the engine, the engine's
warm start."""


import numpy as np
import pytest
from helpers import TINY_FLAGS, tiny_settings
from typer.testing import CliRunner

from sdaccel import runs
from sdaccel.cli import app
from sdaccel.errors import ConfigError
from sdaccel.jobs import read_jobs
from sdaccel.settings import LoraEntry


class RecordingEngine:
    """engine.generate's calls, each answered with one stand-in result per seed."""

    def __init__(self, settings):
        self.settings, self.calls, self.checked, self.starts = settings, [], [], []

    def check_prompts(self, texts):
        self.checked.append(list(texts))

    def generate(self, prompts, negative_prompt="", seed=None, generation=None, sampler=None,
                 loras=None, **start):
        self.calls.append((list(prompts), negative_prompt, seed, generation, loras))
        self.starts.append(start)
        return [f"{prompts[0]}#{k}" for k in seed]


def test_job_k_of_a_run_draws_its_images_from_the_runs_seeds():
    settings = tiny_settings("generation.num_images_per_prompt=3", "seed=100")
    jobs = runs.prompt_jobs(["a", "b"], settings, "dark")
    assert [(j.index, j.prompt, j.negative_prompt, j.seeds) for j in jobs] == [
        (0, "a", "dark", (100, 101, 102)), (1, "b", "dark", (103, 104, 105))]
    assert jobs[1].seed == 103 and list(jobs[1].image_indices(3)) == [3, 4, 5]
    assert jobs[0].generation == settings.generation and jobs[0].loras is None
    own = runs.Job.at(7, "c", settings, seed=5, loras=[LoraEntry(path="bundled:ring")])
    assert own.seeds == (5, 6, 7) and own.index == 7 and len(own.loras) == 1


def test_a_prompts_file_and_the_plain_run_make_the_same_jobs(tmp_path):
    settings = tiny_settings("generation.num_images_per_prompt=2")
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\na blue square\n")
    from_file = read_jobs(path, settings, "dark")
    plain = runs.prompt_jobs(["a red circle", "a blue square"], settings, "dark")
    assert [(j.prompt, j.seeds, j.generation) for j in from_file] == [
        (j.prompt, j.seeds, j.generation) for j in plain]
    assert [j.line for j in from_file] == [1, 3] and plain[0].line is None


def test_images_runs_each_job_as_one_engine_call():
    settings = tiny_settings("generation.num_images_per_prompt=2")
    engine = RecordingEngine(settings)
    jobs = runs.prompt_jobs(["a", "b"], settings)
    out = list(runs.images(engine, jobs))
    assert [(job.prompt, index, result) for job, index, result in out] == [
        ("a", 0, "a#42"), ("a", 1, "a#43"), ("b", 2, "b#44"), ("b", 3, "b#45")]
    assert [call[2] for call in engine.calls] == [[42, 43], [44, 45]]
    assert all(call[3] == settings.generation and call[4] is None for call in engine.calls)
    # A run's prompts are checked together first (one warning for all of them).
    assert engine.checked == [["a", "", "b", ""]]


def test_the_loop_makes_the_images_the_engine_makes_alone():
    """A job's seed list is the engine's own schedule: the same pictures as generate(seed=s)."""
    settings = tiny_settings("generation.num_images_per_prompt=2")
    engine, loaded = runs.start_engine(settings)
    assert loaded == []  # nothing compiles: nothing to load
    (_, _, first), (_, _, second) = list(runs.images(
        engine, runs.prompt_jobs(["x", "a red circle"], settings)))[2:]
    alone = engine.generate(["a red circle"], seed=settings.seed + 2)
    assert [first.seed, second.seed] == [r.seed for r in alone] == [44, 45]
    for ours, theirs in zip((first, second), alone, strict=True):
        assert np.array_equal(np.asarray(ours.image), np.asarray(theirs.image))


def test_warm_start_needs_the_compile_cache_on():
    with pytest.raises(ConfigError, match="compile.enabled=false or compile.cache=false"):
        runs.warm_start(tiny_settings(), "tiny")
    result = CliRunner().invoke(app, ["compile-cache", "load", *TINY_FLAGS])
    assert result.exit_code == 2 and "nothing to load" in result.stderr


def png_bytes(size=(16, 16), color="red", mode="RGB") -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_read_image_refuses_what_is_not_a_whole_image():
    image = runs.read_image(png_bytes(mode="RGBA"), "init.png")
    assert (image.mode, image.size) == ("RGB", (16, 16))
    assert runs.read_image(png_bytes(), "m", mode="L").mode == "L"
    data = png_bytes(size=(64, 64))
    corrupt = bytearray(data)
    corrupt[60] ^= 0xFF  # inside the image data: its chunk checksum no longer matches
    for bad, reason in ((b"hello, not an image", "not an image"),
                        (data[: len(data) // 2], "not a readable image"),
                        (bytes(corrupt), "not a readable image")):
        with pytest.raises(ConfigError, match=f"^init.png: {reason}") as info:
            runs.read_image(bad, "init.png", key="init_images")
        assert info.value.key == "init_images"


def test_a_start_file_is_read_checked_and_hashed(tmp_path):
    import hashlib

    path = tmp_path / "cat.png"
    path.write_bytes(png_bytes())
    file = runs.StartFile.read(path, "--init-image")
    assert file.path == path.resolve()
    assert file.record() == {"path": str(path), "sha256": hashlib.sha256(png_bytes()).hexdigest()}
    assert file.image("init image").size == (16, 16)
    with pytest.raises(ConfigError, match=r"^--init-image: '.*nope.png' does not exist$"):
        runs.StartFile.read(tmp_path / "nope.png", "--init-image")
    with pytest.raises(ConfigError, match="is a folder, not an image file"):
        runs.StartFile.read(tmp_path, "--init-image")
    path.write_bytes(png_bytes(color="blue"))  # changed during the run: not used silently
    with pytest.raises(ConfigError, match="cat.png: the file changed"):
        file.image("init image")


def test_jobs_hand_the_engine_their_init_image_mask_and_hires(tmp_path):
    from sdaccel.settings import HiresSettings

    settings = tiny_settings()
    (tmp_path / "a.png").write_bytes(png_bytes(color="red"))
    (tmp_path / "m.png").write_bytes(png_bytes(color="white"))
    image = runs.StartFile.read(tmp_path / "a.png", "init")
    mask = runs.StartFile.read(tmp_path / "m.png", "mask")
    hires = HiresSettings(enabled=True, scale=1.5)
    jobs = [*runs.prompt_jobs(["x", "y"], settings, "", [image, image], [mask, mask], 6),
            runs.Job.at(2, "z", settings, hires=hires), runs.Job.at(3, "w", settings)]
    engine = RecordingEngine(settings)
    list(runs.images(engine, jobs))
    first = engine.starts[0]["start"]
    assert first.images[0].getpixel((0, 0)) == (255, 0, 0) and first.mask_blur == 6
    assert first.masks[0].mode == "L" and first.masks[0].getpixel((0, 0)) == 255
    assert engine.starts[2:] == [{"hires": hires}, {}]  # text to image: neither argument
    assert jobs[0].sources() == {"init_image": image.record(), "mask": mask.record()}
    assert jobs[2].sources() == {}
    with pytest.raises(ConfigError, match="a mask needs an init image"):
        runs.Job.at(0, "x", settings, mask=mask)
