"""The engine's public seams: UNet wrappers, a step policy handed to the engine, the per-step
callback. Examples and tests extend the engine through these, never by patching its names."""

import typing

import torch
from helpers import tiny_settings

from sdaccel.engine.engine import Engine
from sdaccel.engine.sampling.guider import COND
from sdaccel.engine.sampling.policies import POLICIES, policy_for
from sdaccel.engine.sampling.policy import StepPolicy
from sdaccel.settings import AdaptiveSettings


def test_unet_wrappers_see_every_call_innermost_first():
    seen = []

    def tagging(tag):
        def wrap(call):
            def tagged(unet_input):
                seen.append((tag, unet_input.sample.shape[0], unet_input.slots))
                return call(unet_input)
            return tagged
        return wrap

    engine = Engine(tiny_settings("sampler.steps=2"), unet_wrappers=[tagging("in"),
                                                                      tagging("out")])
    engine.generate(["a red circle"])
    # The outer wrapper runs first; each call is the guided batch, [uncond; cond].
    assert [tag for tag, _, _ in seen] == ["out", "in", "out", "in"]
    assert all(rows == 2 and slots == ((0, 0), (0, 1)) for _, rows, slots in seen)


def test_a_wrapper_can_change_the_model_output():
    plain = Engine(tiny_settings("sampler.steps=3")).generate(["a red circle"], seed=1)[0]
    halved = Engine(tiny_settings("sampler.steps=3"), unet_wrappers=[
        lambda call: lambda unet_input: call(unet_input) * 0.5]).generate(["a red circle"],
                                                                           seed=1)[0]
    assert not torch.equal(plain.latents, halved.latents)


def test_the_step_callback_sees_each_step_and_may_replace_the_latents():
    states = []

    def on_step(state):
        states.append((state.step, state.total_steps, state.decisions, state.latents.shape))
        if state.step == state.total_steps:
            return torch.zeros_like(state.latents)
        return None

    engine = Engine(tiny_settings("sampler.steps=3", "generation.num_images_per_prompt=2"))
    results = engine.generate(["a red circle"], on_step=on_step)
    assert [s[:3] for s in states] == [(1, 3, "FF"), (2, 3, "FF"), (3, 3, "FF")]
    assert all(r.latents.abs().max() == 0 for r in results)


class CondOnly(StepPolicy):
    """A policy of our own: the conditional half alone at every step (guidance off)."""

    name = "cond_only"

    def decide(self, track, index, t):
        return {(row, COND): True for row in range(len(track.positions))}


def test_a_policy_handed_to_the_engine_runs_and_reports_its_work():
    guided = tiny_settings("sampler.steps=3", "generation.guidance_scale=7.5")
    mine = Engine(guided, policy=CondOnly()).generate(["a red circle"], seed=2)[0]
    unguided = Engine(tiny_settings("sampler.steps=3", "generation.guidance_scale=1")).generate(
        ["a red circle"], seed=2)[0]
    assert mine.decisions == "fff" and mine.cost == 1.5  # half a guided call a step
    assert (mine.latents - unguided.latents).abs().max() <= 1e-4


def test_policies_are_chosen_by_name():
    """Every mode the settings accept names a registered policy, and every policy but the
    plain one (adaptive off) is a mode."""
    modes = typing.get_args(AdaptiveSettings.model_fields["mode"].annotation)
    assert set(POLICIES) == {"plain", *modes}
    assert all(POLICIES[name](AdaptiveSettings()).name == name for name in POLICIES)
    assert policy_for(AdaptiveSettings()).name == "plain"
    assert policy_for(AdaptiveSettings(enabled=True, mode="per_step")).name == "per_step"
