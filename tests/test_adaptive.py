"""Adaptive steps: sound re-planning, the seed's decision rule, batches, honest NFE."""

import inspect

import diffusers
import pytest
import torch
from helpers import pipeline_latents, tiny_settings

import sdaccel.engine.sampling.adaptive as adaptive_module
from sdaccel.catalogue import PER_STEP
from sdaccel.engine.engine import Engine
from sdaccel.engine.loading.models import arch_dir
from sdaccel.engine.sampling.adaptive import (
    decide_total,
    pred_var,
    predicted_x0,
    solver_error,
    tail_timesteps,
)
from sdaccel.engine.sampling.samplers import REPLANNABLE, build_scheduler
from sdaccel.errors import ConfigError
from sdaccel.events import PlanDecided


def adaptive(*extra, low=0.1, high=0.25, warmup=3, lo=4, hi=9, sampler="dpm_solver++"):
    return tiny_settings(
        f"sampler.name={sampler}", "adaptive.enabled=true", f"adaptive.warmup_steps={warmup}",
        f"adaptive.min_steps={lo}", f"adaptive.max_steps={hi}",
        f"adaptive.uncertainty.threshold_low={low}",
        f"adaptive.uncertainty.threshold_high={high}", *extra)


@pytest.mark.parametrize("sampler", REPLANNABLE)
@pytest.mark.parametrize(("height", "width", "seed"), [(32, 32, 0), (48, 32, 1234)])
def test_replan_with_the_old_tail_is_bit_identical(sampler, height, width, seed):
    """Every score >= threshold_high keeps max_steps: the re-plan keeps the old tail, and the
    result must equal the uninterrupted fixed-step run exactly."""
    size = [f"generation.height={height}", f"generation.width={width}",
            "generation.num_images_per_prompt=2"]
    kept = Engine(adaptive(*size, low=0, high=1e-9, sampler=sampler)).generate(["a"], seed=seed)
    fixed = Engine(tiny_settings(f"sampler.name={sampler}", "sampler.steps=9", *size))
    reference = fixed.generate(["a"], seed=seed)
    assert [r.steps for r in kept] == [9, 9]
    for a, b in zip(kept, reference, strict=True):
        assert torch.equal(a.latents, b.latents)


# dpm_solver++ on the 9-step plan (max_steps) of the tiny model's scheduler config.
PLAN_9 = [999, 888, 777, 666, 555, 444, 333, 222, 111]


def test_min_steps_when_certain(unet_calls):
    engine = Engine(adaptive(low=10, high=20), unet_wrappers=[unet_calls])
    calls = unet_calls.calls
    results = engine.generate(["a"])
    assert results[0].steps == 4 and results[0].plan.total_steps == 4
    # The warm-up's 3 steps of the 9-step plan, then the one step left at its final timestep.
    assert [c.timestep for c in calls] == [999, 888, 777, 111]


@pytest.mark.parametrize(("score", "timesteps"), [
    (0.0, [999, 888, 777, 111]),  # min_steps
    (0.16, [999, 888, 777, 555, 333, 111]),  # 6 of 9: 3 steps evenly spread below 777 to 111
    (1.0, PLAN_9),  # max_steps: the plan as it was
])
def test_a_shortened_plan_runs_its_timesteps_as_diffusers_would(monkeypatch, unet_calls, score,
                                                                 timesteps):
    """The re-planned run visits exactly the warm-up's timesteps and then the new tail, and draws
    what diffusers draws when given that timestep list from the start."""
    monkeypatch.setattr(adaptive_module, "pred_var",
                        lambda history: torch.full((history[0].shape[0],), score))
    engine = Engine(adaptive(), unet_wrappers=[unet_calls])
    calls = unet_calls.calls
    result = engine.generate(["a red circle"], seed=3)[0]
    assert [c.timestep for c in calls] == timesteps
    assert result.steps == result.plan.total_steps == len(timesteps)
    theirs = pipeline_latents(engine, ["a red circle"], seed=3, timesteps=timesteps)
    assert (result.latents - theirs[0]).abs().max().item() <= 1e-4


def test_warmup_equal_to_min_steps_finishes_in_warmup():
    """The seed's defaults (warm-up 5 = min 5): deciding min_steps means no step after it."""
    results = Engine(adaptive(warmup=4, lo=4, hi=9, low=10, high=20)).generate(["a"])
    assert results[0].steps == 4
    assert torch.isfinite(results[0].latents).all()


@pytest.mark.parametrize(("score", "total"), [
    (0.05, 5), (0.10, 5), (0.18, 13), (0.25, 20), (0.9, 20), (0.13, 8),
])
def test_decision_rule(score, total):
    assert decide_total(score, 5, 20, 0.10, 0.25) == total


def test_tail_is_strictly_below_and_ends_at_final():
    tail = tail_timesteps(801, 1, 4)
    assert tail == sorted(tail, reverse=True) and tail[0] < 801 and tail[-1] == 1
    assert len(tail) == 4
    assert tail_timesteps(801, 1, 0) == []
    assert len(tail_timesteps(5, 1, 10)) == 4  # only 4 distinct timesteps below 5


def test_pred_var_is_zero_when_the_prediction_stops_moving():
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(pred_var([x, x, x]), torch.zeros(2))
    moving = pred_var([x, x + 1.0, x + 2.0])
    assert (moving > 0).all()


def test_batch_images_get_their_own_plans_and_honest_nfe(monkeypatch, unet_calls):
    """Two images deciding different totals: each keeps its own steps and file-name steps,
    and the UNet work adds up to exactly the reported NFE."""
    monkeypatch.setattr(adaptive_module, "pred_var",
                        lambda history: torch.tensor([0.0, 1.0][: history[0].shape[0]]))
    events = []
    engine = Engine(adaptive("generation.num_images_per_prompt=2"), on_event=events.append,
                    unet_wrappers=[unet_calls])
    calls = unet_calls.calls
    results = engine.generate(["a red circle"], seed=3)
    assert [r.steps for r in results] == [4, 9]
    assert [r.nfe for r in results] == [8, 18]  # guided: two evaluations per step
    assert sum(c.rows for c in calls) == sum(r.nfe for r in results)
    # The warm-up together (2 images, guided: 4 rows), then each group on its own timesteps.
    assert [(c.rows, c.timestep) for c in calls] == [
        (4, 999), (4, 888), (4, 777), (2, 111), *((2, t) for t in PLAN_9[3:])]
    plans = [e for e in events if isinstance(e, PlanDecided)]
    assert [(p.seed, p.total_steps, p.warmup_steps) for p in plans] == [(3, 4, 3), (4, 9, 3)]

    # Each image equals the same decision made for it alone (batch size changes arithmetic only).
    monkeypatch.setattr(adaptive_module, "pred_var", lambda history: torch.tensor([1.0]))
    one = engine.settings.generation.model_copy(update={"num_images_per_prompt": 1})
    alone = engine.generate(["a red circle"], seed=4, generation=one)[0]
    assert alone.steps == 9
    assert (alone.latents - results[1].latents).abs().max().item() <= 1e-4


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_samplers_that_cannot_replan_are_refused(sampler):
    with pytest.raises(ConfigError, match=f"sampler.name '{sampler}' cannot"):
        adaptive(sampler=sampler)


def test_solver_error_estimator_runs():
    results = Engine(adaptive("adaptive.uncertainty.method=solver_error", low=0,
                              high=1e9)).generate(["a"])
    assert results[0].plan.method == "solver_error" and results[0].plan.score > 0


@pytest.mark.parametrize("scheduler_name", ["DDPMScheduler", "DPMSolverMultistepScheduler"])
def test_estimators_stay_finite_on_a_zero_terminal_snr_schedule(scheduler_name):
    """A model trained with `rescale_betas_zero_snr`: alpha_bar(999) = 0 (DDPM) or 2**-24
    (DPM-Solver). At t=999 the model's v is -x0, and the solver-error score must stay finite."""
    scheduler = getattr(diffusers, scheduler_name)(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
    sample, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x0_first = predicted_x0(scheduler, sample, v, 999)
    # x0 = alpha * sample - sigma * v with alpha_bar floored at 2**-24: alpha = 2**-12 and
    # 1 - sigma ~ 2**-25, so x0 + v = 2**-12 * sample up to float32 rounding of both products.
    assert ((x0_first + v).abs() <= 2**-12 * sample.abs() + 2**-22 * v.abs()).all()
    assert not torch.equal(x0_first, -v)  # the sample's small share is there
    x0_next = predicted_x0(scheduler, sample, torch.randn_like(v), 949)
    score = solver_error([x0_first, x0_next], scheduler, [999, 949], 899)
    assert torch.isfinite(score).all() and (score > 0).all()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", PER_STEP)  # every sampler an adaptive mode can use
def test_predicted_x0_is_the_schedulers_own(sampler, prediction):
    """predicted_x0 (the estimators' and step skipping's x0) against the x0 each diffusers
    scheduler computes itself: step()'s pred_original_sample, the multistep solvers' converted
    output."""
    config = diffusers.DDPMScheduler.load_config(arch_dir("tiny") / "scheduler")
    scheduler = build_scheduler(sampler, {**config, "prediction_type": prediction})
    scheduler.set_timesteps(10)
    sample, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in scheduler.timesteps[[1, 5, 9]]:
        ours = predicted_x0(scheduler, sample, output, t)
        scheduler.set_timesteps(10)  # a fresh plan: step() finds t's index in it
        noise = ({"generator": torch.Generator().manual_seed(0)}
                 if "generator" in inspect.signature(scheduler.step).parameters else {})
        step = scheduler.step(output, t, sample, **noise, return_dict=True)
        if isinstance(scheduler, (diffusers.DPMSolverMultistepScheduler,
                                  diffusers.UniPCMultistepScheduler)):
            theirs = scheduler.model_outputs[-1]  # step()'s convert_model_output, kept
        else:
            theirs = step.pred_original_sample
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5), (sampler, float(t))
