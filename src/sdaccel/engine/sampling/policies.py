"""Step policies by name, as settings choose them (`adaptive.mode`; adaptive off: plain).

A new policy is a StepPolicy subclass (policy.py says what it answers) and one line here."""

from __future__ import annotations

from collections.abc import Callable

from sdaccel.engine.sampling.adaptive import Replan
from sdaccel.engine.sampling.policy import StepPolicy
from sdaccel.engine.sampling.stepwise import PerStep

POLICIES: dict[str, Callable[..., StepPolicy]] = {
    StepPolicy.name: StepPolicy.from_settings,
    Replan.name: Replan.from_settings,
    PerStep.name: PerStep.from_settings,
}


def policy_for(adaptive) -> StepPolicy:
    """The policy settings.AdaptiveSettings choose."""
    return POLICIES[adaptive.mode if adaptive.enabled else StepPolicy.name](adaptive)
