"""Adaptive steps: uncertainty estimators and the re-planning step policy. Pure tensor code, no
I/O.

How a run goes (the seed's scheme, made exact):
1. Every image starts on the plan for `max_steps`.
2. After `warmup_steps` UNet evaluations, and before the solver update that uses the last of
   them, each image gets an uncertainty score from what the warm-up already computed (no extra
   UNet evaluations).
3. The score picks the total number of steps, warm-up included:
   score <= threshold_low -> min_steps, score >= threshold_high -> max_steps, linear in between
   (rounded to the nearest step).
4. The plan is re-made from where the sample is: the visited timesteps stay, and the remaining
   `total - warmup` timesteps are spread evenly from just below the last visited timestep down to
   the plan's final timestep. The scheduler keeps its solver state (DPM-Solver++'s multistep
   history, its step index) across the change, so the trajectory continues rather than restarts.
   Images of one batch that decide different totals continue as separate groups.

Estimators (all scale-free; computed per image on the predicted clean latents x0_hat):
- pred_var: variance of x0_hat across the warm-up evaluations, averaged over latent elements,
  divided by the variance of the latest x0_hat over its elements. "How much does the picture the
  model sees still move?" High early in generation and for images the model is unsure about.
- solver_error: the local error estimate of a second-order multistep solver: the difference
  between its second- and first-order updates at the last warm-up step, relative to the sample.
  For DPM-Solver++(2M) that difference is 0.5 * alpha_t * (exp(-h) - 1) * (x0_hat_i -
  x0_hat_{i-1}) * h / h_prev in lambda = log(alpha / sigma) terms; other samplers use the same
  formula on their own timesteps.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from sdaccel.catalogue import ESTIMATORS  # settings.UncertaintySettings.method
from sdaccel.engine.sampling.policy import StepPolicy
from sdaccel.engine.sampling.track import Decision

# --------------------------------------------------------------------------- x0 and scores


def alpha_sigma(scheduler, timestep) -> tuple[float, float]:
    """VP-schedule alpha_t and sigma_t (sqrt of alpha_bar and of 1 - alpha_bar)."""
    # A zero-terminal-SNR schedule has alpha_bar = 0 at t=999 in DDPM/DDIM; the floor is
    # DPM-Solver's own, and keeps log(alpha / sigma) finite.
    alpha_bar = max(float(scheduler.alphas_cumprod[int(timestep)]), 2.0**-24)
    return alpha_bar**0.5, (1 - alpha_bar) ** 0.5


def predicted_x0(scheduler, sample: torch.Tensor, model_output: torch.Tensor,
                 timestep) -> torch.Tensor:
    """The clean latents the model predicts from `sample` at `timestep` (VP form; sample is the
    unscaled latent as the loop holds it for ddpm/dpm, the sigma-scaled one for euler/heun/lms)."""
    alpha, sigma = alpha_sigma(scheduler, timestep)
    if _is_sigma_space(scheduler):
        sample = sample * alpha  # Euler samplers hold x_t / alpha_t
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction == "v_prediction":
        return alpha * sample - sigma * model_output
    return model_output  # "sample"


def model_output_for(scheduler, sample: torch.Tensor, x0: torch.Tensor,
                     timestep) -> torch.Tensor:
    """The model output from which `predicted_x0` gives back `x0` (its inverse)."""
    alpha, sigma = alpha_sigma(scheduler, timestep)
    if _is_sigma_space(scheduler):
        sample = sample * alpha
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return (sample - alpha * x0) / sigma
    if prediction == "v_prediction":
        return (alpha * sample - x0) / sigma
    return x0


def _is_sigma_space(scheduler) -> bool:
    """The k-diffusion-style schedulers hold x_t / alpha_t (x0 + sigma * noise)."""
    return type(scheduler).__name__.startswith(("Euler", "Heun", "LMS"))


def pred_var(x0_history: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per image: variance of x0_hat across evaluations / variance of the latest x0_hat."""
    stack = torch.stack([x.float() for x in x0_history])  # [steps, batch, ...]
    spread = stack.var(dim=0, unbiased=False).flatten(1).mean(dim=1)
    scale = stack[-1].flatten(1).var(dim=1, unbiased=False).clamp_min(1e-12)
    return spread / scale


def solver_error(x0_history: Sequence[torch.Tensor], scheduler, timesteps: Sequence[int],
                 next_timestep: int | None) -> torch.Tensor:
    """Per image: |second-order - first-order update| / |first-order update| at the last
    warm-up step (0 when there is no earlier evaluation to compare with)."""
    latest = x0_history[-1].float()
    if len(x0_history) < 2:
        return torch.zeros(latest.shape[0])
    previous = x0_history[-2].float()
    lam = [lambda_of(scheduler, t) for t in timesteps[-2:]]
    lam_next = lambda_of(scheduler, next_timestep) if next_timestep is not None else lam[-1] + 5.0
    h, h_prev = lam_next - lam[-1], lam[-1] - lam[0]
    alpha_next = alpha_sigma(scheduler, next_timestep)[0] if next_timestep is not None else 1.0
    factor = 0.5 * alpha_next * abs(np.expm1(-h)) * h / max(h_prev, 1e-8)
    correction = factor * (latest - previous).flatten(1).norm(dim=1)
    return correction / latest.flatten(1).norm(dim=1).clamp_min(1e-12)


def lambda_of(scheduler, timestep) -> float:
    """log(alpha_t / sigma_t): the time variable of DPM-Solver, and of step skipping's lines."""
    alpha, sigma = alpha_sigma(scheduler, timestep)
    return float(np.log(alpha / max(sigma, 1e-12)))


# --------------------------------------------------------------------------- decisions


def decide_total(score: float, min_steps: int, max_steps: int, low: float, high: float) -> int:
    """score <= low -> min_steps; >= high -> max_steps; linear in between, rounded half up."""
    if score <= low:
        return min_steps
    if score >= high or high <= low:
        return max_steps
    fraction = (score - low) / (high - low)
    return int(np.floor(min_steps + fraction * (max_steps - min_steps) + 0.5))  # half up


def tail_timesteps(last_visited: int, final: int, remaining: int) -> list[int]:
    """`remaining` integer timesteps strictly below `last_visited`, evenly spread down to `final`.
    Fewer when the range holds fewer distinct timesteps."""
    if remaining <= 0:
        return []
    top = last_visited - 1
    if top <= final:
        return [final] if final < last_visited else []
    points = np.linspace(last_visited, final, remaining + 1)[1:]
    tail = sorted({int(round(p)) for p in points if round(p) < last_visited}, reverse=True)
    return tail


# --------------------------------------------------------------------------- re-planning

# Scheduler attributes that carry the trajectory so far and must survive set_timesteps().
_STATE = ("model_outputs", "lower_order_nums", "_step_index", "_begin_index")


def replan(scheduler, timesteps: Sequence[int]) -> None:
    """Give `scheduler` a new timestep list (visited prefix + new tail), keeping its solver state.

    diffusers' set_timesteps() resets the multistep history and step counter; that reset
    mid-run would be wrong, so they are carried over. Prefix timesteps map to the same sigmas as
    before, so a re-plan whose tail equals the old one changes nothing, bit for bit.
    """
    device = scheduler.timesteps.device
    state = {name: copy.copy(getattr(scheduler, name)) for name in _STATE
             if hasattr(scheduler, name)}
    # Values pass through as given: Euler's timesteps are fractional and must stay exact.
    scheduler.set_timesteps(timesteps=[float(t) if isinstance(t, float) else int(t)
                                       for t in timesteps], device=device)
    for name, value in state.items():
        setattr(scheduler, name, value)


def split_scheduler(scheduler, indices: torch.Tensor):
    """A copy of `scheduler` whose per-image state holds only the images at `indices`."""
    part = copy.copy(scheduler)
    part.__dict__ = dict(scheduler.__dict__)
    if getattr(scheduler, "model_outputs", None) is not None:
        part.model_outputs = [None if m is None else m[indices] for m in scheduler.model_outputs]
    return part


# --------------------------------------------------------------------------- the policy


class Replan(StepPolicy):
    """The re-planning step policy (adaptive.mode replan): every image starts on the plan for
    `max_steps`; after the warm-up its score picks its own total (the seed's rule), and images
    that chose the same total continue as one track on a re-made copy of the scheduler."""

    name = "replan"

    def __init__(self, method: str, warmup_steps: int, min_steps: int, max_steps: int,
                 threshold_low: float, threshold_high: float) -> None:
        if method not in ESTIMATORS:
            raise ValueError(f"unknown uncertainty method {method!r}; valid: {ESTIMATORS}")
        self.method = method
        self.warmup_steps = warmup_steps
        self.min_steps, self.max_steps = min_steps, max_steps
        self.low, self.high = threshold_low, threshold_high

    @classmethod
    def from_settings(cls, adaptive) -> Replan:
        u = adaptive.uncertainty
        return cls(u.method, adaptive.warmup_steps, adaptive.min_steps, adaptive.max_steps,
                   u.threshold_low, u.threshold_high)

    def steps(self, sampler_steps: int) -> int:
        return self.max_steps

    def start(self, batch: int, guider) -> None:
        super().start(batch, guider)
        self.history: list[torch.Tensor] = []  # x0_hat of the whole batch at each warm-up step

    def plan(self, track, index: int, t, noise: torch.Tensor) -> list:
        timesteps = track.scheduler.timesteps
        if index >= self.warmup_steps or self.warmup_steps >= len(timesteps):
            return [(track, noise)]
        self.history.append(predicted_x0(track.scheduler, track.latents, noise, t))
        if index < self.warmup_steps - 1:  # the last warm-up update waits for the new plan
            return [(track, noise)]
        visited = [step.item() for step in timesteps[:self.warmup_steps]]
        scores = self.scores(self.history, track.scheduler, visited,
                             timesteps[self.warmup_steps].item())
        totals = self.totals(scores)
        groups = []
        for chosen in sorted(set(totals)):
            rows = torch.tensor([k for k, total in enumerate(totals) if total == chosen])
            part = track.select(rows, split_scheduler(track.scheduler, rows))
            # Keeping the full plan is a re-plan too (with the old tail): it must change nothing.
            if chosen == len(timesteps):
                tail = [step.item() for step in timesteps[self.warmup_steps:]]
            else:
                tail = tail_timesteps(visited[-1], timesteps[-1].item(),
                                      chosen - self.warmup_steps)
            replan(part.scheduler, visited + tail)
            groups.append((part, noise[rows]))
            self.decisions += [
                Decision(int(track.positions[k]), self.method, float(scores[k]),
                         self.warmup_steps, len(part.scheduler.timesteps), self.max_steps)
                for k in rows.tolist()]
        self.decisions.sort(key=lambda d: d.position)
        return groups

    def scores(self, x0_history: Sequence[torch.Tensor], scheduler,
               visited: Sequence[int], next_timestep: int | None) -> torch.Tensor:
        if self.method == "pred_var":
            return pred_var(x0_history)
        return solver_error(x0_history, scheduler, visited, next_timestep)

    def totals(self, scores: torch.Tensor) -> list[int]:
        return [decide_total(float(s), self.min_steps, self.max_steps, self.low, self.high)
                for s in scores]
