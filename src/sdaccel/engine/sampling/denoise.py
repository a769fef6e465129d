"""The denoising loop: classifier-free guidance over a scheduler's plan, one callback per step.

With a fixed plan it mirrors StableDiffusionPipeline.__call__ step for step (the correctness
contract), with one deliberate difference that only shows at reduced precision: latents and the
scheduler's arithmetic stay in fp32 while the UNet runs in its own dtype, so a bf16 UNet does not
also round every solver update to bf16.

With a Planner (adaptive steps), the batch runs the warm-up together, each image is scored and
given its own total, and the images continue in groups of equal totals, each group on its own
re-planned copy of the scheduler (see adaptive.py).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from sdaccel.engine.sampling.adaptive import (
    Planner,
    predicted_x0,
    replan,
    split_scheduler,
    tail_timesteps,
)

# (step, total_steps, images in the group, one decision letter per image (see stepwise.py)[,
# each image's cost so far])
StepCallback = Callable[..., None]


@dataclass(frozen=True)
class Decision:
    """What the planner chose for one image of the batch."""

    position: int
    score: float
    total_steps: int


@dataclass
class DenoiseOutput:
    latents: torch.Tensor
    steps: list[int]  # per image: solver steps taken
    decisions: list[Decision]  # the re-planner's, one per image (empty without it)
    # per image: what ran at each UNet call of the plan, one letter a call (stepwise.py); one
    # call a step but for Heun (2n - 1 calls for n steps)
    codes: list[str]
    costs: list[float]  # per image: UNet work in full-UNet equivalents

    @classmethod
    def full_calls(cls, latents: torch.Tensor, steps: list[int], decisions: list[Decision],
                   calls: list[int] | None = None) -> DenoiseOutput:
        """The plain loop's and the re-planner's output: a full UNet call at every call of the
        plan (`calls` per image; default: one a step)."""
        calls = steps if calls is None else calls
        return cls(latents, steps, decisions, ["F" * n for n in calls], [float(n) for n in calls])


def solver_steps(scheduler: Any) -> int:
    """Solver steps in the scheduler's plan. Its timesteps list one entry per UNet call, and a
    step of an order-2 scheduler (Heun) takes two calls but the first: 2n - 1 for n steps."""
    return math.ceil(len(scheduler.timesteps) / scheduler.order)


@dataclass
class _Group:
    """Images that share one plan: their latents, prompt embeddings, generators, scheduler."""

    positions: torch.Tensor
    latents: torch.Tensor
    embeddings: torch.Tensor
    generators: list[torch.Generator]
    scheduler: Any
    eta: float | None = None  # the step's eta where it takes one (sampler.eta or its default)

    @property
    def guided(self) -> bool:
        return self.embeddings.shape[0] == 2 * self.latents.shape[0]

    @cached_property
    def step_extra(self) -> dict[str, Any]:
        """The scheduler.step() extras, worked out once per group rather than per step."""
        return step_kwargs(self.scheduler, self.generators, self.eta)

    def select(self, rows: torch.Tensor, scheduler: Any) -> _Group:
        embeddings = self.embeddings
        if self.guided:  # [uncond; cond] -> the same rows of each half
            half = self.latents.shape[0]
            embeddings = torch.cat([embeddings[:half][rows], embeddings[half:][rows]])
        else:
            embeddings = embeddings[rows]
        return _Group(self.positions[rows], self.latents[rows], embeddings,
                      [self.generators[int(r)] for r in rows], scheduler, self.eta)


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


def _evaluate(unet, unet_dtype, group: _Group, t, guidance_scale: float) -> torch.Tensor:
    """One UNet call for the group: the guided noise prediction at timestep t (fp32)."""
    latents = group.latents
    model_input = torch.cat([latents] * 2) if group.guided else latents
    model_input = group.scheduler.scale_model_input(model_input, t).to(unet_dtype)
    noise = unet(model_input, t, encoder_hidden_states=group.embeddings, return_dict=False)[0]
    noise = noise.float()
    if group.guided:
        uncond, cond = noise.chunk(2)
        noise = uncond + guidance_scale * (cond - uncond)
    return noise


def _update(group: _Group, noise: torch.Tensor, t) -> None:
    group.latents = group.scheduler.step(noise, t, group.latents, **group.step_extra,
                                         return_dict=False)[0]


def _run(unet, unet_dtype, group: _Group, start: int, guidance_scale: float,
         on_step: StepCallback) -> None:
    timesteps = group.scheduler.timesteps
    for index in range(start, len(timesteps)):
        t = timesteps[index]
        _update(group, _evaluate(unet, unet_dtype, group, t, guidance_scale), t)
        on_step(index + 1, len(timesteps), len(group.positions), "F" * len(group.positions))


def denoise(
    unet: Callable[..., Any],
    unet_dtype: torch.dtype,
    scheduler: Any,
    latents: torch.Tensor,
    embeddings: torch.Tensor,
    guidance_scale: float,
    generators: Sequence[torch.Generator],
    on_step: StepCallback,
    planner: Planner | None = None,
    eta: float | None = None,
) -> DenoiseOutput:
    """Run `scheduler`'s plan from `latents` (fp32, already scaled by init_noise_sigma).

    `embeddings` holds [unconditional; conditional] when guidance is on, else the conditional
    embeddings alone; that choice was made by whoever encoded the prompts. With a planner the
    scheduler must hold the plan for planner.max_steps and accept custom timesteps. `eta`:
    the step's eta for schedulers that take one (None: 0, as the pipeline's default).
    """
    batch = latents.shape[0]
    group = _Group(torch.arange(batch), latents, embeddings, list(generators), scheduler, eta)
    total = len(scheduler.timesteps)  # UNet calls (Heun: two a step but the first)
    if planner is None or planner.warmup_steps >= total:
        _run(unet, unet_dtype, group, 0, guidance_scale, on_step)
        return DenoiseOutput.full_calls(group.latents, [solver_steps(scheduler)] * batch, [],
                                        [total] * batch)

    timesteps = scheduler.timesteps
    history = []
    warmup = planner.warmup_steps
    for index in range(warmup):
        t = timesteps[index]
        noise = _evaluate(unet, unet_dtype, group, t, guidance_scale)
        history.append(predicted_x0(scheduler, group.latents, noise, t))
        if index < warmup - 1:  # the last warm-up update waits for the new plan
            _update(group, noise, t)
            on_step(index + 1, total, batch, "F" * batch)

    visited = [t.item() for t in timesteps[:warmup]]
    scores = planner.scores(history, scheduler, visited, timesteps[warmup].item())
    totals = planner.totals(scores)
    out = torch.empty_like(latents)
    steps = [0] * batch
    for chosen in sorted(set(totals)):
        rows = torch.tensor([k for k in range(batch) if totals[k] == chosen])
        part = group.select(rows, split_scheduler(scheduler, rows))
        # Keeping the full plan is a re-plan too (with the old tail): it must change nothing.
        if chosen == total:
            tail = [t.item() for t in timesteps[warmup:]]
        else:
            tail = tail_timesteps(visited[-1], timesteps[-1].item(), chosen - warmup)
        replan(part.scheduler, visited + tail)
        _update(part, noise[rows], timesteps[warmup - 1])
        on_step(warmup, len(part.scheduler.timesteps), len(rows), "F" * len(rows))
        _run(unet, unet_dtype, part, warmup, guidance_scale, on_step)
        out[rows] = part.latents
        for row in rows.tolist():
            steps[row] = len(part.scheduler.timesteps)
    decisions = [Decision(k, float(scores[k]), steps[k]) for k in range(batch)]
    return DenoiseOutput.full_calls(out, steps, decisions)
