"""Sampler name -> diffusers scheduler, built from the catalogue's one table.

Adding a sampler is one entry in sdaccel.catalogue.SAMPLER_TABLE; nothing here changes. Schedulers
are built from the model's own scheduler config, so its training schedule (betas, offsets,
prediction type) carries over unchanged; the entry's options make the variant. diffusers is
imported on first use.
"""

from __future__ import annotations

from typing import Any

from sdaccel.catalogue import REPLANNABLE, SAMPLER_NAMES, SAMPLERS, a1111_label, sampler

__all__ = ["REPLANNABLE", "SAMPLERS", "SAMPLER_NAMES", "a1111_label", "build_scheduler",
           "scheduler_class"]


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class the named sampler uses."""
    import diffusers

    return getattr(diffusers, sampler(name).scheduler)


def build_scheduler(name: str, model_scheduler_config: dict[str, Any]):
    """A fresh scheduler of the named kind, configured like the model's own scheduler."""
    return scheduler_class(name).from_config(dict(model_scheduler_config),
                                             **sampler(name).options)
