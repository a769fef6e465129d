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
from sdaccel.catalogue import (
    ESTIMATORS,
    REPLANNABLE,
    SAMPLER_NAMES,
    SAMPLER_TABLE,
    SCHEDULE_OPTIONS,
    SCHEDULES,
)
from sdaccel.errors import ConfigError
from sdaccel.settings import SamplerSettings, UncertaintySettings

ADAPTIVE_GUIDE = Path(__file__).resolve().parents[1] / "docs" / "adaptive.md"


def bundled_scheduler_config() -> dict:
    path = resources.files("sdaccel.bundled") / "shapes" / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("entry", SAMPLER_TABLE, ids=lambda e: e.name)
def test_every_entry_builds_its_scheduler_with_its_options(entry):
    import diffusers

    from sdaccel.engine.sampling.samplers import build_scheduler

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
    """Re-planning hands the scheduler a custom timestep list mid-run (adaptive.replan): a
    re-plannable sampler takes one, on every schedule that is a timestep spacing, and takes one
    step per timestep (Heun's two calls a step would be cut in half). Settings refuse mode
    replan for the others; LCM and TCD take a list but have no plan worth re-making."""
    from sdaccel.engine.sampling.adaptive import replan, tail_timesteps
    from sdaccel.engine.sampling.samplers import build_scheduler, scheduler_class

    cls = scheduler_class(entry.name)
    takes_timesteps = "timesteps" in inspect.signature(cls.set_timesteps).parameters
    for schedule in ("default", "trailing")[:len(entry.schedules)]:
        scheduler = build_scheduler(entry.name, bundled_scheduler_config(), schedule)
        scheduler.set_timesteps(10)
        visited = [t.item() for t in scheduler.timesteps[:3]]
        tail = tail_timesteps(visited[-1], scheduler.timesteps[-1].item(), 4)
        if entry.replannable:
            assert takes_timesteps and cls.order == 1
            replan(scheduler, visited + tail)
            assert len(scheduler.timesteps) == 7
            adaptive_replan = tiny_settings("adaptive.enabled=true", f"sampler.name={entry.name}",
                                            f"sampler.schedule={schedule}")
            assert adaptive_replan.adaptive.mode == "replan"
        elif not takes_timesteps:
            with pytest.raises(TypeError):
                replan(scheduler, visited + tail)
    if not entry.replannable:
        with pytest.raises(ConfigError, match=f"sampler.name '{entry.name}' cannot"):
            tiny_settings("adaptive.enabled=true", f"sampler.name={entry.name}")


@pytest.mark.parametrize("entry", SAMPLER_TABLE, ids=lambda e: e.name)
def test_a_sampler_takes_exactly_the_schedules_that_change_its_plan(entry):
    """Each schedule an entry lists sets its diffusers option and changes the plan (timesteps
    or sigmas) from the default; each it does not list would leave the plan as it is (the
    class has no such option, or, as LCM's and TCD's timestep_spacing, ignores it)."""
    from sdaccel.engine.sampling.samplers import build_scheduler

    def plan(schedule):
        scheduler = build_scheduler(entry.name, bundled_scheduler_config(), schedule)
        scheduler.set_timesteps(7)
        sigmas = getattr(scheduler, "sigmas", None)
        return scheduler, [scheduler.timesteps.tolist(), None if sigmas is None
                           else [round(float(s), 6) for s in sigmas]]

    default = plan("default")[1]
    for schedule in SCHEDULES[1:]:
        scheduler, changed = plan(schedule)
        assert (schedule in entry.schedules) == (changed != default), schedule
        if schedule in entry.schedules:
            for key, value in SCHEDULE_OPTIONS[schedule].items():
                assert scheduler.config[key] == value


def test_a_named_schedule_replaces_the_models_own_sigmas():
    """A model whose scheduler config asks for Karras sigmas keeps them on "default" and gets
    what it asks for on another schedule."""
    from sdaccel.engine.sampling.samplers import build_scheduler

    karras_model = {**bundled_scheduler_config(), "use_karras_sigmas": True}
    assert build_scheduler("dpm_solver++", karras_model).config.use_karras_sigmas
    trailing = build_scheduler("dpm_solver++", karras_model, "trailing").config
    assert not trailing.use_karras_sigmas and trailing.timestep_spacing == "trailing"
    exponential = build_scheduler("euler", karras_model, "exponential").config
    assert not exponential.use_karras_sigmas and exponential.use_exponential_sigmas


def test_eta_defaults_are_those_of_the_samplers_steps():
    """An entry's eta default exists exactly where its diffusers step takes an eta."""
    from sdaccel.engine.sampling.samplers import scheduler_class

    for entry in SAMPLER_TABLE:
        takes_eta = "eta" in inspect.signature(scheduler_class(entry.name).step).parameters
        assert takes_eta == (entry.eta is not None), entry.name
    assert catalogue.sampler("tcd").eta == 0.3 and catalogue.sampler("ddim").eta == 0.0


def test_every_estimator_is_an_adaptive_function_the_replan_policy_accepts():
    from sdaccel.engine.sampling import adaptive

    for name in ESTIMATORS:
        assert callable(getattr(adaptive, name))
        adaptive.Replan(name, 2, 3, 4, 0.1, 0.2)


def test_the_adaptive_guide_names_the_re_plannable_samplers():
    text = ADAPTIVE_GUIDE.read_text()
    line = re.search(r"Samplers that can re-plan: (.*?) \(", text)
    assert line, "docs/adaptive.md lost its 'Samplers that can re-plan:' sentence"
    assert re.findall(r"`([^`]+)`", line.group(1)) == list(REPLANNABLE)


def test_settings_and_outputs_import_neither_torch_nor_the_engine():
    code = ("import sys, sdaccel.settings, sdaccel.outputs, sdaccel.catalogue; "
            "print([m for m in sys.modules "
            "if m.startswith(('torch', 'diffusers', 'sdaccel.engine'))])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
