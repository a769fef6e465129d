"""The catalogue is the one table of samplers and estimators: the engine builds what it names,
settings accept exactly its names, and reading it loads neither torch nor the engine."""

import inspect
import json
import re
import subprocess
import sys
import typing
from importlib import resources
from pathlib import Path

import pytest
from helpers import tiny_settings

from sdaccel import catalogue
from sdaccel.catalogue import ESTIMATORS, REPLANNABLE, SAMPLER_NAMES, SAMPLER_TABLE
from sdaccel.errors import ConfigError
from sdaccel.settings import SamplerSettings, UncertaintySettings

README = Path(__file__).resolve().parents[1] / "README.md"


def bundled_scheduler_config() -> dict:
    path = resources.files("sdaccel.bundled") / "shapes" / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("entry", SAMPLER_TABLE, ids=lambda e: e.name)
def test_every_entry_builds_its_scheduler_with_its_options(entry):
    import diffusers

    from sdaccel.engine.samplers import build_scheduler

    config = bundled_scheduler_config()
    scheduler = build_scheduler(entry.name, config)
    assert type(scheduler) is getattr(diffusers, entry.scheduler)
    for key, value in entry.options.items():
        assert scheduler.config[key] == value
    # The model's training schedule carries over where the option does not change it.
    for key in ("beta_start", "beta_end", "beta_schedule", "prediction_type"):
        if key in scheduler.config and key not in entry.options:
            assert scheduler.config[key] == config[key]


def test_settings_accept_exactly_the_catalogue_names():
    assert set(typing.get_args(SamplerSettings.model_fields["name"].annotation)) == set(
        SAMPLER_NAMES)
    assert set(typing.get_args(UncertaintySettings.model_fields["method"].annotation)) == set(
        ESTIMATORS)
    assert SamplerSettings().name in SAMPLER_NAMES


def test_names_and_a1111_labels_are_unique():
    assert len({e.name for e in SAMPLER_TABLE}) == len(SAMPLER_TABLE)
    assert len({e.a1111 for e in SAMPLER_TABLE}) == len(SAMPLER_TABLE)
    assert catalogue.a1111_label("dpm_solver++") == "DPM++ 2M"
    with pytest.raises(ValueError, match="unknown sampler 'plms'; valid: ddpm, "):
        catalogue.a1111_label("plms")


@pytest.mark.parametrize("entry", SAMPLER_TABLE, ids=lambda e: e.name)
def test_replannable_is_what_the_re_planner_can_do(entry):
    """Re-planning hands the scheduler a custom timestep list mid-run (adaptive.replan); the flag
    says whether the scheduler takes one, and settings refuse mode replan where it does not."""
    from sdaccel.engine.adaptive import replan, tail_timesteps
    from sdaccel.engine.samplers import build_scheduler, scheduler_class

    takes_timesteps = "timesteps" in inspect.signature(
        scheduler_class(entry.name).set_timesteps).parameters
    assert entry.replannable == takes_timesteps

    scheduler = build_scheduler(entry.name, bundled_scheduler_config())
    scheduler.set_timesteps(10)
    visited = [t.item() for t in scheduler.timesteps[:3]]
    tail = tail_timesteps(visited[-1], scheduler.timesteps[-1].item(), 4)
    if entry.replannable:
        replan(scheduler, visited + tail)
        assert len(scheduler.timesteps) == 7
        adaptive_replan = tiny_settings("adaptive.enabled=true", f"sampler.name={entry.name}")
        assert adaptive_replan.adaptive.mode == "replan"
    else:
        with pytest.raises(TypeError):
            replan(scheduler, visited + tail)
        with pytest.raises(ConfigError, match=f"sampler.name '{entry.name}' cannot"):
            tiny_settings("adaptive.enabled=true", f"sampler.name={entry.name}")


def test_every_estimator_is_an_adaptive_function_the_planner_accepts():
    from sdaccel.engine import adaptive

    for name in ESTIMATORS:
        assert callable(getattr(adaptive, name))
        adaptive.Planner(name, 2, 3, 4, 0.1, 0.2)


def test_readme_names_the_re_plannable_samplers():
    text = README.read_text()
    line = re.search(r"Samplers that can re-plan: (.*?) \(", text)
    assert line, "README lost its 'Samplers that can re-plan:' sentence"
    assert re.findall(r"`([^`]+)`", line.group(1)) == list(REPLANNABLE)


def test_settings_and_outputs_import_neither_torch_nor_the_engine():
    code = ("import sys, sdaccel.settings, sdaccel.outputs, sdaccel.catalogue; "
            "print([m for m in sys.modules "
            "if m.startswith(('torch', 'diffusers', 'sdaccel.engine'))])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
