"""Sampler name -> diffusers scheduler, one registry.

Adding a sampler is one entry in SAMPLERS. Schedulers are built from the model's own scheduler
config, so its training schedule (betas, offsets, prediction type) carries over unchanged.
diffusers is imported inside the factories: settings validation imports this module and must not
pull in torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _ddpm(config: dict[str, Any]):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config)


def _ddim(config: dict[str, Any]):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config)


def _dpm_solver_pp(config: dict[str, Any]):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")


def _euler(config: dict[str, Any]):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(config)


def _euler_a(config: dict[str, Any]):
    from diffusers import EulerAncestralDiscreteScheduler

    return EulerAncestralDiscreteScheduler.from_config(config)


# name -> (factory, label that A1111-style metadata readers know)
SAMPLERS: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "ddpm": (_ddpm, "DDPM"),
    "ddim": (_ddim, "DDIM"),
    "dpm_solver++": (_dpm_solver_pp, "DPM++ 2M"),
    "euler": (_euler, "Euler"),
    "euler_a": (_euler_a, "Euler a"),
}
SAMPLER_NAMES = tuple(SAMPLERS)
# Samplers whose diffusers scheduler takes a custom timestep list, which adaptive re-planning
# needs (DDIM and Euler-ancestral derive each step's size from the step count instead).
REPLANNABLE = ("ddpm", "dpm_solver++", "euler")


def build_scheduler(name: str, model_scheduler_config: dict[str, Any]):
    """A fresh scheduler of the named kind, configured like the model's own scheduler."""
    factory, _ = SAMPLERS[name]
    return factory(dict(model_scheduler_config))


def a1111_label(name: str) -> str:
    return SAMPLERS[name][1]
