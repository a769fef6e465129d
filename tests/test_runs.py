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
        self.settings, self.calls, self.checked = settings, [], []

    def check_prompts(self, texts):
        self.checked.append(list(texts))

    def generate(self, prompts, negative_prompt="", seed=None, generation=None, sampler=None,
                 loras=None):
        self.calls.append((list(prompts), negative_prompt, seed, generation, loras))
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
