"""The step policy: what the denoising loop (loop.py) asks at every step, and the plain answer.

A policy answers four questions, and this base class answers them as StableDiffusionPipeline
does (every step of the sampler's plan, the full UNet on every half):

- `steps(sampler_steps)`: the plan to start on (a re-planning policy starts on its maximum);
- `decide(track, index, t)`: the slots to evaluate at this step, (row, half) -> full or
  shallow; a row with no slot is not evaluated;
- `fill(track, index, t, slots, outputs)`: the model output the scheduler steps with, for every
  row, from what was evaluated (and, for rows that were not, from the policy's own history);
- `plan(track, index, t, noise)`: the plan each row continues on: the track itself, or groups
  of its rows on re-made plans, each with its rows of `noise`.

Policies are chosen by name (policies.POLICIES, settings' `adaptive.mode`) or handed to the
Engine (`Engine(settings, policy=...)`). `start` is called before every batch: a policy keeps
per-batch state only from there.
"""

from __future__ import annotations

import torch

from sdaccel.engine.sampling.guider import COND, UNCOND, Guider, Slot
from sdaccel.engine.sampling.track import Decision, Track


class StepPolicy:
    """The plain policy: the sampler's plan, the full UNet at every step."""

    name = "plain"
    # Rows of a batch decide their own work step by step (progress shows each row).
    per_image = False
    # The shallow level this policy's feature caching needs (None: it does not cache).
    cache_level: int | None = None
    cache_forecast = True  # deep features extrapolated from the last two full calls (else reused)

    @classmethod
    def from_settings(cls, adaptive) -> StepPolicy:  # noqa: ARG003 - one signature for all
        return cls()

    def steps(self, sampler_steps: int) -> int:
        return sampler_steps

    def start(self, batch: int, guider: Guider) -> None:
        self.guider = guider
        self.decisions: list[Decision] = []

    def decide(self, track: Track, index: int, t) -> dict[Slot, bool]:
        return self.guider.all_full(len(track.positions))

    def fill(self, track: Track, index: int, t, slots: dict[Slot, bool],
             outputs: dict[Slot, torch.Tensor]) -> torch.Tensor:
        rows = range(len(track.positions))
        cond = torch.stack([outputs[(row, COND)] for row in rows])
        uncond = [outputs.get((row, UNCOND)) for row in rows]
        if all(u is None for u in uncond):  # unguided
            return cond
        if all(u is not None for u in uncond):  # every row guided: one combination
            return self.guider.combine(torch.stack(uncond), cond)
        # Rows without their unconditional half take the conditional prediction alone.
        return torch.stack([c if u is None else self.guider.combine(u, c)
                            for u, c in zip(uncond, cond, strict=True)])

    def plan(self, track: Track, index: int, t,
             noise: torch.Tensor) -> list[tuple[Track, torch.Tensor]]:
        return [(track, noise)]
