"""What sdaccel offers by name: the samplers and the adaptive uncertainty estimators, a table each.

Plain data. Nothing here imports torch, diffusers or sdaccel.engine, so that settings validation,
output metadata and the CLI's help text can read the names without loading a model stack; the
engine turns an entry into a scheduler (sdaccel.engine.sampling.samplers.build_scheduler).

Adding a sampler is one entry in SAMPLER_TABLE: a name, the diffusers scheduler class (by name)
and the constructor options that make the variant (applied over the model's own scheduler
config, so its training schedule carries over), whether adaptive re-planning can use it, and the
label AUTOMATIC1111-style metadata readers know; the schedules it takes (sampler.schedule), its
eta default when its step takes one (sampler.eta), and why adaptive modes cannot use it where
they cannot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class SamplerEntry:
    name: str  # settings' sampler.name
    scheduler: str  # a diffusers scheduler class, by name
    a1111: str  # the label AUTOMATIC1111's readers know ("Sampler: ..." in PNG parameters)
    # adaptive.mode replan re-makes the plan mid-trajectory: the scheduler's set_timesteps() must
    # take a custom timestep list, one UNet call a step. DDIM and Euler-ancestral derive each
    # step's size from the step count instead; LMS and UniPC take no list.
    replannable: bool
    # Constructor options over the model's scheduler config (the variant is configuration).
    options: Mapping[str, Any] = field(default_factory=dict)
    # The sampler.schedule values it takes: those whose diffusers option its class has and
    # honours (tests/test_catalogue.py: each changes the plan).
    schedules: tuple[str, ...] = ("default",)
    # Its step's eta when sampler.eta is null (None: its step takes no eta), and the key
    # A1111 writes a different eta under in PNG parameters.
    eta: float | None = None
    eta_label: str = "Eta"
    # adaptive.mode per_step extrapolates x0 between UNet calls at distinct noise levels.
    per_step: bool = True
    # Why the adaptive modes it refuses cannot work with it (the settings error says so).
    not_adaptive: str = ""
    # Why it takes no schedule but its own, where that needs saying.
    own_schedule: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        unknown = set(self.schedules) - set(SCHEDULES)
        if unknown or "default" not in self.schedules:
            raise ValueError(f"sampler {self.name!r}: schedules {self.schedules} must include "
                             f"'default' and be among {SCHEDULES}")


# sampler.schedule: "default" is the model's own scheduler config; the others are the
# diffusers options below, and A1111's "Schedule type" labels (A1111 1.9+ PNG parameters).
SCHEDULES: tuple[str, ...] = ("default", "karras", "exponential", "trailing")
SCHEDULE_OPTIONS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "default": MappingProxyType({}),
    "karras": MappingProxyType({"use_karras_sigmas": True}),
    "exponential": MappingProxyType({"use_exponential_sigmas": True}),
    "trailing": MappingProxyType({"timestep_spacing": "trailing"}),
})
SCHEDULE_LABELS: Mapping[str, str] = MappingProxyType({
    "default": "Automatic", "karras": "Karras", "exponential": "Exponential",
    "trailing": "SGM Uniform",
})
# Schedules that set their own sigmas: diffusers refuses a custom timestep list with them, and
# a re-plan is one.
SIGMA_SCHEDULES: tuple[str, ...] = ("karras", "exponential")

_SPACING = ("default", "trailing")  # timestep_spacing only: the class has no sigma options
_ALL = SCHEDULES
_FEW_STEP = ("a few-step sampler (1-8 steps, each jumping to the model's x0 estimate and "
             "noising it again): there is no plan to re-make and no smooth trajectory to skip "
             "along")
_OWN_SPACING = ("its own schedule already starts at the last training timestep, as trailing "
                "does; diffusers' class ignores timestep_spacing")


SAMPLER_TABLE: tuple[SamplerEntry, ...] = (
    SamplerEntry("ddpm", "DDPMScheduler", "DDPM", replannable=True, schedules=_SPACING),
    SamplerEntry("ddim", "DDIMScheduler", "DDIM", replannable=False, schedules=_SPACING,
                 eta=0.0, eta_label="Eta DDIM"),
    SamplerEntry("dpm_solver++", "DPMSolverMultistepScheduler", "DPM++ 2M", replannable=True,
                 options={"algorithm_type": "dpmsolver++"}, schedules=_ALL),
    SamplerEntry("dpm_solver++_sde", "DPMSolverMultistepScheduler", "DPM++ 2M SDE",
                 replannable=True, options={"algorithm_type": "sde-dpmsolver++"},
                 schedules=_ALL),
    SamplerEntry("euler", "EulerDiscreteScheduler", "Euler", replannable=True, schedules=_ALL),
    SamplerEntry("euler_a", "EulerAncestralDiscreteScheduler", "Euler a", replannable=False,
                 schedules=_SPACING),
    # Heun's plan lists 2n - 1 UNet calls for n steps (a step's second call at the next
    # step's noise level): a re-plan would cut a step in half, per-step decisions would
    # extrapolate between two calls at one noise level.
    SamplerEntry("heun", "HeunDiscreteScheduler", "Heun", replannable=False, schedules=_ALL,
                 per_step=False, not_adaptive="2 UNet calls a step, the second at the next "
                 "step's noise level: a re-plan would cut a step in half and per-step "
                 "decisions have no noise-level step between those two calls"),
    SamplerEntry("lms", "LMSDiscreteScheduler", "LMS", replannable=False, schedules=_ALL),
    SamplerEntry("unipc", "UniPCMultistepScheduler", "UniPC", replannable=False,
                 schedules=_ALL),
    SamplerEntry("lcm", "LCMScheduler", "LCM", replannable=False, per_step=False,
                 not_adaptive=_FEW_STEP, own_schedule=_OWN_SPACING),
    # eta is the TCD paper's gamma (0: deterministic, 1: as LCM); 0.3 is diffusers' default.
    SamplerEntry("tcd", "TCDScheduler", "TCD", replannable=False, eta=0.3, per_step=False,
                 not_adaptive=_FEW_STEP, own_schedule=_OWN_SPACING),
)

SAMPLERS: Mapping[str, SamplerEntry] = MappingProxyType({s.name: s for s in SAMPLER_TABLE})
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
REPLANNABLE: tuple[str, ...] = tuple(s.name for s in SAMPLER_TABLE if s.replannable)
PER_STEP: tuple[str, ...] = tuple(s.name for s in SAMPLER_TABLE if s.per_step)
TAKE_ETA: tuple[str, ...] = tuple(s.name for s in SAMPLER_TABLE if s.eta is not None)

# adaptive.uncertainty.method (mode replan); each is a function of that name in
# sdaccel.engine.sampling.adaptive.
ESTIMATORS: tuple[str, ...] = ("pred_var", "solver_error")


def sampler(name: str) -> SamplerEntry:
    """The entry for `name`; an unknown name is an error that lists the known ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLER_NAMES)}") from None


def a1111_label(name: str) -> str:
    return sampler(name).a1111
