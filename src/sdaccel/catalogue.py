"""What sdaccel offers by name: the samplers and the adaptive uncertainty estimators, a table each.

Plain data. Nothing here imports torch, diffusers or sdaccel.engine, so that settings validation,
output metadata and the CLI's help text can read the names without loading a model stack; the
engine turns an entry into a scheduler (sdaccel.engine.samplers.build_scheduler).

Adding a sampler is one entry in SAMPLER_TABLE: a name, the diffusers scheduler class (by name)
and the constructor options that make the variant (applied over the model's own scheduler
config, so its training schedule carries over), whether adaptive re-planning can use it, and the
label AUTOMATIC1111-style metadata readers know.
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
    # take a custom timestep list. DDIM and Euler-ancestral derive each step's size from the
    # step count instead.
    replannable: bool
    # Constructor options over the model's scheduler config (the variant is configuration).
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))


SAMPLER_TABLE: tuple[SamplerEntry, ...] = (
    SamplerEntry("ddpm", "DDPMScheduler", "DDPM", replannable=True),
    SamplerEntry("ddim", "DDIMScheduler", "DDIM", replannable=False),
    SamplerEntry("dpm_solver++", "DPMSolverMultistepScheduler", "DPM++ 2M", replannable=True,
                 options={"algorithm_type": "dpmsolver++"}),
    SamplerEntry("euler", "EulerDiscreteScheduler", "Euler", replannable=True),
    SamplerEntry("euler_a", "EulerAncestralDiscreteScheduler", "Euler a", replannable=False),
)

SAMPLERS: Mapping[str, SamplerEntry] = MappingProxyType({s.name: s for s in SAMPLER_TABLE})
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
REPLANNABLE: tuple[str, ...] = tuple(s.name for s in SAMPLER_TABLE if s.replannable)

# adaptive.uncertainty.method (mode replan); each is a function of that name in
# sdaccel.engine.adaptive.
ESTIMATORS: tuple[str, ...] = ("pred_var", "solver_error")


def sampler(name: str) -> SamplerEntry:
    """The entry for `name`; an unknown name is an error that lists the known ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLER_NAMES)}") from None


def a1111_label(name: str) -> str:
    return sampler(name).a1111
