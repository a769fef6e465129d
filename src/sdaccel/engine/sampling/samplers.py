"""Sampler name -> diffusers scheduler, built from the catalogue's one table.

Adding a sampler is one entry in sdaccel.catalogue.SAMPLER_TABLE; nothing here changes. Schedulers
are built from the model's own scheduler config, so its training schedule (betas, offsets,
prediction type) carries over unchanged; the entry's options make the variant. diffusers is
imported on first use.
"""

from __future__ import annotations

import inspect
from typing import Any

from sdaccel.catalogue import (
    REPLANNABLE,
    SAMPLER_NAMES,
    SAMPLERS,
    SCHEDULE_OPTIONS,
    a1111_label,
    sampler,
)

__all__ = ["REPLANNABLE", "SAMPLERS", "SAMPLER_NAMES", "a1111_label", "build_scheduler",
           "schedule_options", "scheduler_class"]

# The options by which a model's scheduler config may choose its own sigmas.
_SIGMA_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class the named sampler uses."""
    import diffusers

    return getattr(diffusers, sampler(name).scheduler)


def schedule_options(name: str, schedule: str) -> dict[str, Any]:
    """The constructor options of sampler.schedule for the named sampler. "default" keeps the
    model's config; a named schedule replaces it, so sigma options the model's config switches
    on are switched off first (a karras config asked for "trailing" gets trailing)."""
    if schedule == "default":
        return {}
    accepted = inspect.signature(scheduler_class(name).__init__).parameters
    return {**{key: False for key in _SIGMA_OPTIONS if key in accepted},
            **SCHEDULE_OPTIONS[schedule]}


def build_scheduler(name: str, model_scheduler_config: dict[str, Any],
                    schedule: str = "default"):
    """A fresh scheduler of the named kind, configured like the model's own scheduler, on
    the given sampler.schedule (settings checked that the sampler takes it)."""
    return scheduler_class(name).from_config(dict(model_scheduler_config),
                                             **sampler(name).options,
                                             **schedule_options(name, schedule))
