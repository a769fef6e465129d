"""A track: images of a batch that follow one plan (the loop runs one track after another), and
what a re-planning policy decided for each image."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch


@dataclass(frozen=True)
class Decision:
    """What a re-planning policy chose for one image of the batch."""

    position: int
    method: str  # the uncertainty estimator that scored it
    score: float
    warmup_steps: int
    total_steps: int
    max_steps: int


@dataclass
class Track:
    """Images that follow one plan: their rows of the batch, latents, generators, scheduler."""

    positions: torch.Tensor  # rows of the batch
    latents: torch.Tensor
    generators: list[torch.Generator]
    scheduler: Any
    eta: float | None = None  # the step's eta where it takes one (sampler.eta or its default)
    index: int = 0  # the next entry of scheduler.timesteps
    # Inpainting (engine/starts.py): channels appended to each image's UNet input, one row per
    # image of the batch; or a blend of the latents after each step
    extra: torch.Tensor | None = None
    blend: Callable | None = None

    @cached_property
    def step_extra(self) -> dict[str, Any]:
        """The scheduler.step() extras, worked out once per track rather than per step."""
        return step_kwargs(self.scheduler, self.generators, self.eta)

    def select(self, rows: torch.Tensor, scheduler: Any) -> Track:
        """The images at `rows` of this track, on `scheduler`."""
        return Track(self.positions[rows], self.latents[rows],
                     [self.generators[int(r)] for r in rows], scheduler, self.eta, self.index,
                     self.extra, self.blend)


def step_kwargs(scheduler: Any, generators: Sequence[torch.Generator],
                eta: float | None = None) -> dict[str, Any]:
    """The per-step extras this scheduler takes: its noise generators, and its eta (DDIM, TCD)
    as given, else 0 as StableDiffusionPipeline's own default passes it."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0 if eta is None else eta
    if "generator" in accepted:
        kwargs["generator"] = list(generators)
    return kwargs
