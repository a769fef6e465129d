"""The denoising loop: one for every mode. At each step the step policy decides what the model
must evaluate (policies.py), the guider evaluates it (guider.py), the policy fills in the model
output for the scheduler, may re-plan, and the scheduler steps.

With the plain policy it mirrors StableDiffusionPipeline.__call__ step for step (the correctness
contract), with one deliberate difference that only shows at reduced precision: latents and the
scheduler's arithmetic stay in fp32 while the UNet runs in its own dtype, so a bf16 UNet does not
also round every solver update to bf16.

A policy may split the batch into tracks, groups of images that continue on their own plan (a
re-planned copy of the scheduler); tracks run one after the other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sdaccel.engine.sampling.guider import Guider, Slot
from sdaccel.engine.sampling.policy import StepPolicy
from sdaccel.engine.sampling.track import Decision, Track


@dataclass(frozen=True)
class StepState:
    """A step just taken, as a per-step callback sees it (diffusers' callback_on_step_end)."""

    step: int  # 1-based: UNet calls of the track's plan done so far
    total_steps: int  # UNet calls in the track's plan (Heun: 2n - 1 for n solver steps)
    timestep: torch.Tensor
    positions: torch.Tensor  # the track's rows of the batch
    latents: torch.Tensor  # the track's latents after the step (fp32)
    decisions: str  # what ran for each row at this step (ImageResult.decisions' letters)
    costs: tuple[float, ...]  # each row's UNet work so far, in full-UNet equivalents


# A per-step callback may return new latents for the track (same shape) or None.
StepCallback = Callable[[StepState], "torch.Tensor | None"]


@dataclass
class _Record:
    """One image's account: what ran at each UNet call, and what it cost."""

    codes: list[str] = field(default_factory=list)
    cost: float = 0.0
    steps: int = 0


@dataclass
class SampleOutput:
    latents: torch.Tensor
    steps: list[int]  # per image: solver steps taken
    codes: list[str]  # per image: one letter per UNet call of its plan
    costs: list[float]  # per image: UNet work in full-UNet equivalents
    decisions: list[Decision]  # a re-planning policy's, one per image (else empty)


def solver_steps(scheduler: Any) -> int:
    """Solver steps in the scheduler's plan. Its timesteps list one entry per UNet call, and a
    step of an order-2 scheduler (Heun) takes two calls but the first: 2n - 1 for n steps."""
    return math.ceil(len(scheduler.timesteps) / scheduler.order)


def sample(track: Track, guider: Guider, policy: StepPolicy,
           on_step: StepCallback | None = None) -> SampleOutput:
    """Run `track` (the whole batch, latents already scaled by init_noise_sigma, its scheduler
    holding the plan to start on) to the end of its plan, and of every plan it splits into."""
    batch = len(track.positions)
    policy.start(batch, guider)
    records = [_Record() for _ in range(batch)]
    latents = torch.empty_like(track.latents)
    pending: list[tuple[Track, torch.Tensor | None, Any]] = [(track, None, None)]
    while pending:
        track, noise, t = pending.pop(0)
        if noise is not None:  # split from another track after its evaluation
            _advance(track, noise, t, records, on_step)
        while track.index < len(track.scheduler.timesteps):
            t = track.scheduler.timesteps[track.index]
            slots = policy.decide(track, track.index, t)
            model_input = track.scheduler.scale_model_input(track.latents, t)
            outputs = guider.evaluate(model_input.to(guider.unet_dtype), t, slots,
                                      track.positions, track.index)
            noise = policy.fill(track, track.index, t, slots, outputs)
            _account(records, track.positions, slots, guider)
            (track, noise), *others = policy.plan(track, track.index, t, noise)
            pending[:0] = [(other, part, t) for other, part in others]
            _advance(track, noise, t, records, on_step)
        latents[track.positions] = track.latents
        for row in track.positions.tolist():
            records[row].steps = solver_steps(track.scheduler)
    return SampleOutput(latents, [r.steps for r in records], ["".join(r.codes) for r in records],
                        [r.cost for r in records], policy.decisions)


def _account(records: list[_Record], positions: torch.Tensor, slots: dict[Slot, bool],
             guider: Guider) -> None:
    """Each image's letter for the step (F full, C cached; lower case without the
    unconditional half; - not evaluated) and its cost."""
    for row, position in enumerate(positions.tolist()):
        record = records[position]
        ran = [half for half in guider.halves if (row, half) in slots]
        if not ran:
            record.codes.append("-")
            continue
        letter = "F" if slots[(row, ran[0])] else "C"
        record.codes.append(letter if len(ran) == len(guider.halves) else letter.lower())
        record.cost += guider.cost(slots, row)


def _advance(track: Track, noise: torch.Tensor, t, records: list[_Record],
             on_step: StepCallback | None) -> None:
    """The scheduler's update from the model output, then the callback."""
    track.latents = track.scheduler.step(noise, t, track.latents, **track.step_extra,
                                         return_dict=False)[0]
    track.index += 1
    if on_step is None:
        return
    mine = [records[p] for p in track.positions.tolist()]
    state = StepState(track.index, len(track.scheduler.timesteps), t, track.positions,
                      track.latents, "".join(r.codes[-1] for r in mine),
                      tuple(r.cost for r in mine))
    replaced = on_step(state)
    if replaced is not None:
        track.latents = replaced
