"""Adaptive compute per step and per image: the sampler's own plan, with each image deciding at
every step how much of the UNet it needs.

At each step an image takes one of these, shown by one letter in its decision string:

- `F` full UNet (both halves with guidance);
- `C` the shallow branch only, on deep features from earlier full calls (feature_cache.py),
  extrapolated from the last two (TaylorSeer, 2025) or reused as they are (DeepCache);
- `f` / `c` the same for the conditional half alone, the unconditional half not evaluated:
  between refreshes the guidance direction (cond - uncond) is extrapolated from the last two
  refreshes (or reused); after the guidance cut-off the conditional prediction is taken alone
  (guidance 1, as diffusers' CFG cut-off callback does);
- `-` no UNet call: the step is filled from the solver's own history. The predicted clean image
  x0 is extrapolated linearly in lambda = log(alpha / sigma) from the last two evaluated steps and
  handed to the scheduler as the model output that gives that x0, so every sampler takes its
  usual update (solver-aware, as SADA; AdaptiveDiffusion reuses the last noise instead).

The skip test: at every evaluated step each image measures how far the linear extrapolation from
its two previous evaluations would have missed (relative L2 error of x0); that error grows with
the square of the step in lambda, so the next step is skipped when the error scaled to it is below
`skip.threshold`, at most `skip.max_consecutive` times in a row. The first `warmup_steps` and the
last `skip.final_steps` steps always run the full UNet. Rows of a batch decide independently; a
step runs at most two UNet calls (full rows, shallow rows) on just the rows that need them.

Cost is charged per row in FLOPs (cost.py): a full call of one image's halves is 1, a shallow
call its FLOP fraction, a skipped step 0. The UNet calls themselves, feature caching's included,
are the guider's (guider.py); this policy only decides and fills.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sdaccel.engine.sampling.adaptive import lambda_of, model_output_for, predicted_x0
from sdaccel.engine.sampling.guider import COND, UNCOND, Slot, linear
from sdaccel.engine.sampling.policy import StepPolicy


@dataclass
class ImageState:
    """One image's state across the steps."""

    history: list[tuple[float, torch.Tensor]] = field(default_factory=list)  # (lambda, x0)
    error: float = math.inf  # relative miss of the last extrapolation check
    error_step: float = 1.0  # the lambda step that miss was measured over
    skips: int = 0  # consecutive skipped steps
    since_uncond: int = 0
    cut: bool = False  # guidance cut off: conditional half only from now on
    # (lambda, cond - uncond) of the last two unconditional evaluations
    deltas: list[tuple[float, torch.Tensor]] = field(default_factory=list)

    def scaled_error(self, lam: float) -> float:
        """The miss of a linear extrapolation to `lam`, from the last one measured (a linear
        extrapolation's error grows with the square of the step)."""
        if len(self.history) < 2:
            return math.inf
        step = lam - self.history[-1][0]
        return self.error * (step / self.error_step) ** 2

    def extrapolate(self, lam: float) -> torch.Tensor:
        return linear(self.history, lam)

    def record(self, lam: float, x0: torch.Tensor) -> None:
        if len(self.history) >= 2:
            miss = (x0 - self.extrapolate(lam)).norm() / x0.norm().clamp_min(1e-12)
            self.error, self.error_step = float(miss), lam - self.history[-1][0]
        self.history = [*self.history[-1:], (lam, x0)]


@dataclass
class PerStep(StepPolicy):
    """Per-step, per-image decisions (adaptive.mode per_step): skip, cache, guidance."""

    warmup_steps: int = 4
    final_steps: int = 1
    skip_threshold: float = 0.0  # 0: never skip a step
    max_skips: int = 1
    cache_interval: int = 1  # 1: no feature caching
    level: int = 0  # the shallow level feature caching runs at
    cache_threshold: float = math.inf  # refresh early when the scaled skip error exceeds it
    cache_forecast: bool = True  # extrapolate the deep features (False: reuse, as DeepCache)
    guidance_interval: int = 1  # 1: the unconditional half at every step
    guidance_cutoff: float = 1.0  # fraction of the steps after which it stops; 1: never
    guidance_agree: float = 0.0  # stop it once |cond - uncond| / |cond| is below; 0: never
    guidance_forecast: bool = True  # extrapolate cond - uncond (False: reuse the last)

    name = "per_step"
    per_image = True

    @classmethod
    def from_settings(cls, adaptive) -> PerStep:
        return cls(
            warmup_steps=adaptive.warmup_steps, final_steps=adaptive.skip.final_steps,
            skip_threshold=adaptive.skip.threshold, max_skips=adaptive.skip.max_consecutive,
            cache_interval=adaptive.cache.interval, level=adaptive.cache.level,
            cache_threshold=(math.inf if adaptive.cache.threshold is None
                             else adaptive.cache.threshold),
            cache_forecast=adaptive.cache.forecast,
            guidance_interval=adaptive.guidance.interval, guidance_cutoff=adaptive.guidance.cutoff,
            guidance_agree=adaptive.guidance.agree_threshold,
            guidance_forecast=adaptive.guidance.forecast,
        )

    @property
    def cache_level(self) -> int | None:
        return self.level if self.cache_interval > 1 else None

    def start(self, batch: int, guider) -> None:
        super().start(batch, guider)
        self.images = [ImageState() for _ in range(batch)]

    # ------------------------------------------------------------------ decisions

    def decide(self, track, index: int, t) -> dict[Slot, bool]:
        """slot (row, half) -> True for a full call, False for a shallow one; absent: not run.
        The rows are the batch's (this policy never splits it)."""
        total = len(track.scheduler.timesteps)
        lam = lambda_of(track.scheduler, t)
        protected = index < self.warmup_steps or index >= total - self.final_steps
        cutoff = index >= math.ceil(self.guidance_cutoff * total)
        slots: dict[Slot, bool] = {}
        for k, image in enumerate(self.images):
            error = image.scaled_error(lam)
            if (not protected and self.skip_threshold > 0 and image.skips < self.max_skips
                    and error < self.skip_threshold):
                image.skips += 1
                image.since_uncond += 1
                continue
            image.skips = 0
            for half in self._halves(image, protected, cutoff):
                slots[(k, half)] = protected or self._needs_full((k, half), index, error)
        return slots

    def _halves(self, image: ImageState, protected: bool, cutoff: bool) -> list[int]:
        if not self.guider.guided:
            return [COND]
        image.cut = image.cut or cutoff
        if not image.cut and (protected or image.since_uncond + 1 >= self.guidance_interval):
            return [COND, UNCOND]
        return [COND]

    def _needs_full(self, slot: Slot, index: int, error: float) -> bool:
        last = self.guider.cache.last_full(slot) if self.guider.cache else None
        if last is None:
            return True
        return index - last >= self.cache_interval or error > self.cache_threshold

    # ------------------------------------------------------------------ filling in

    def fill(self, track, index: int, t, slots: dict[Slot, bool],
             outputs: dict[Slot, torch.Tensor]) -> torch.Tensor:
        lam = lambda_of(track.scheduler, t)
        noise = torch.empty_like(track.latents)
        for k, image in enumerate(self.images):
            noise[k] = self._noise(image, k, outputs, track, t, lam)
        return noise

    def _noise(self, image: ImageState, k: int, outputs: dict, track, t,
               lam: float) -> torch.Tensor:
        """This image's model output for the scheduler, and its bookkeeping for the step."""
        scheduler, sample = track.scheduler, track.latents[k]
        cond = outputs.get((k, COND))
        if cond is None:  # skipped: fill from the solver's history
            return model_output_for(scheduler, sample[None], image.extrapolate(lam)[None], t)[0]
        if (k, UNCOND) in outputs:
            delta = cond - outputs[(k, UNCOND)]
            image.deltas = [*image.deltas[-1:], (lam, delta)]
            image.since_uncond = 0
            noise = self.guider.combine(outputs[(k, UNCOND)], cond)
            if self.guidance_agree > 0 and delta.norm() < self.guidance_agree * cond.norm():
                image.cut = True
        elif self.guider.guided and not image.cut:
            image.since_uncond += 1
            deltas = image.deltas if self.guidance_forecast else image.deltas[-1:]
            noise = cond + (self.guider.guidance_scale - 1) * linear(deltas, lam)
        else:
            noise = cond
        image.record(lam, predicted_x0(scheduler, sample[None], noise[None], t)[0])
        return noise
