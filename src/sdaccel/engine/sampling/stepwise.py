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
call its FLOP fraction, a skipped step 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sdaccel.engine.sampling.adaptive import lambda_of, model_output_for, predicted_x0
from sdaccel.engine.sampling.denoise import DenoiseOutput, solver_steps

COND, UNCOND = 1, 0


@dataclass(frozen=True)
class StepPolicy:
    """What the per-step decisions may do (settings.AdaptiveSettings, mode per_step)."""

    warmup_steps: int = 4
    final_steps: int = 1
    skip_threshold: float = 0.0  # 0: never skip a step
    max_skips: int = 1
    cache_interval: int = 1  # 1: no feature caching
    cache_level: int = 0
    cache_threshold: float = math.inf  # refresh early when the scaled skip error exceeds it
    cache_forecast: bool = True  # extrapolate the deep features (False: reuse, as DeepCache)
    guidance_interval: int = 1  # 1: the unconditional half at every step
    guidance_cutoff: float = 1.0  # fraction of the steps after which it stops; 1: never
    guidance_agree: float = 0.0  # stop it once |cond - uncond| / |cond| is below; 0: never
    guidance_forecast: bool = True  # extrapolate cond - uncond (False: reuse the last)

    @classmethod
    def from_settings(cls, adaptive) -> StepPolicy:
        return cls(
            warmup_steps=adaptive.warmup_steps, final_steps=adaptive.skip.final_steps,
            skip_threshold=adaptive.skip.threshold, max_skips=adaptive.skip.max_consecutive,
            cache_interval=adaptive.cache.interval, cache_level=adaptive.cache.level,
            cache_threshold=(math.inf if adaptive.cache.threshold is None
                             else adaptive.cache.threshold),
            cache_forecast=adaptive.cache.forecast,
            guidance_interval=adaptive.guidance.interval, guidance_cutoff=adaptive.guidance.cutoff,
            guidance_agree=adaptive.guidance.agree_threshold,
            guidance_forecast=adaptive.guidance.forecast,
        )

    @property
    def caches(self) -> bool:
        return self.cache_interval > 1


@dataclass
class _Image:
    """One image's state across the steps."""

    history: list[tuple[float, torch.Tensor]] = field(default_factory=list)  # (lambda, x0)
    error: float = math.inf  # relative miss of the last extrapolation check
    error_step: float = 1.0  # the lambda step that miss was measured over
    skips: int = 0  # consecutive skipped steps
    since_uncond: int = 0
    cut: bool = False  # guidance cut off: conditional half only from now on
    # (lambda, cond - uncond) of the last two unconditional evaluations
    deltas: list[tuple[float, torch.Tensor]] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
    cost: float = 0.0

    def scaled_error(self, lam: float) -> float:
        """The miss of a linear extrapolation to `lam`, from the last one measured (a linear
        extrapolation's error grows with the square of the step)."""
        if len(self.history) < 2:
            return math.inf
        step = lam - self.history[-1][0]
        return self.error * (step / self.error_step) ** 2

    def extrapolate(self, lam: float) -> torch.Tensor:
        return _linear(self.history, lam)

    def record(self, lam: float, x0: torch.Tensor) -> None:
        if len(self.history) >= 2:
            miss = (x0 - self.extrapolate(lam)).norm() / x0.norm().clamp_min(1e-12)
            self.error, self.error_step = float(miss), lam - self.history[-1][0]
        self.history = [*self.history[-1:], (lam, x0)]


def _linear(points: list[tuple[float, torch.Tensor]], at: float) -> torch.Tensor:
    """The line through the last two (position, value) points, at `at`; the last value alone
    when there is one point."""
    if len(points) < 2:
        return points[-1][1]
    (p_b, v_b), (p_a, v_a) = points[-2:]
    return v_a + (v_a - v_b) * ((at - p_a) / (p_a - p_b))


class StepwiseDenoiser:
    """Runs one batch through the plan with per-step, per-image decisions."""

    def __init__(self, unet, layered, unet_dtype: torch.dtype, policy: StepPolicy,
                 shallow_cost: float = 1.0) -> None:
        """`unet`: the (possibly compiled) forward for plain full calls; `layered`: a
        LayeredUNet of the same model where the policy caches features; `shallow_cost`: a
        shallow call's FLOPs as a fraction of a full one."""
        self.unet, self.layered = unet, layered
        self.unet_dtype, self.policy = unet_dtype, policy
        self.shallow_cost = shallow_cost

    def __call__(self, scheduler, latents: torch.Tensor, embeddings: torch.Tensor,
                 guidance_scale: float, step_extra: dict, on_step) -> DenoiseOutput:
        batch = latents.shape[0]
        guided = embeddings.shape[0] == 2 * batch
        images = [_Image() for _ in range(batch)]
        # slot -> [(step, deep features)] of its last two full calls
        self._deep: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        timesteps = scheduler.timesteps
        for index, t in enumerate(timesteps):
            lam = lambda_of(scheduler, t)
            protected = (index < self.policy.warmup_steps
                         or index >= len(timesteps) - self.policy.final_steps)
            cutoff = index >= math.ceil(self.policy.guidance_cutoff * len(timesteps))
            slots = self._decide(images, index, lam, protected, guided, cutoff)
            model_input = scheduler.scale_model_input(latents, t).to(self.unet_dtype)
            outputs = self._evaluate(slots, model_input, t, embeddings, batch, index)
            noise = torch.empty_like(latents)
            for k, image in enumerate(images):
                noise[k] = self._noise(image, k, slots, outputs, scheduler, latents[k], t, lam,
                                       guidance_scale, guided)
            latents = scheduler.step(noise, t, latents, **step_extra, return_dict=False)[0]
            on_step(index + 1, len(timesteps), batch, "".join(i.codes[-1] for i in images),
                    tuple(i.cost for i in images))
        return DenoiseOutput(latents, [solver_steps(scheduler)] * batch, [],
                             ["".join(i.codes) for i in images], [i.cost for i in images])

    # ------------------------------------------------------------------ decisions

    def _decide(self, images: list[_Image], index: int, lam: float, protected: bool,
                guided: bool, cutoff: bool) -> dict[tuple[int, int], bool]:
        """slot (image, half) -> True for a full call, False for a shallow one; absent: not run."""
        policy = self.policy
        slots: dict[tuple[int, int], bool] = {}
        for k, image in enumerate(images):
            error = image.scaled_error(lam)
            if (not protected and policy.skip_threshold > 0 and image.skips < policy.max_skips
                    and error < policy.skip_threshold):
                image.skips += 1
                image.since_uncond += 1
                continue
            image.skips = 0
            halves = [COND]
            if guided:
                image.cut = image.cut or cutoff
                if not image.cut and (protected or image.since_uncond + 1
                                      >= policy.guidance_interval):
                    halves.append(UNCOND)
            for half in halves:
                slots[(k, half)] = protected or self._needs_full((k, half), index, error)
        return slots

    def _needs_full(self, slot: tuple[int, int], index: int, error: float) -> bool:
        if not self.policy.caches or slot not in self._deep:
            return True
        age = index - self._deep[slot][-1][0]
        return age >= self.policy.cache_interval or error > self.policy.cache_threshold

    # ------------------------------------------------------------------ UNet calls

    def _evaluate(self, slots: dict[tuple[int, int], bool], model_input: torch.Tensor, t,
                  embeddings: torch.Tensor, batch: int, index: int) -> dict:
        """Run the full and the shallow slots (each one call); slot -> fp32 output."""
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        for full in (True, False):
            # Unconditional rows first, as the plain loop batches them: an all-full step is
            # the plain loop's call, bit for bit.
            chosen = sorted((s for s, f in slots.items() if f == full),
                            key=lambda s: (s[1], s[0]))
            if not chosen:
                continue
            rows = torch.tensor([k for k, _ in chosen])
            context = torch.stack([embeddings[_row(s, batch, embeddings)] for s in chosen])
            x = model_input[rows]
            if not full:
                deep = torch.cat([self._forecast(self._deep[s], index) for s in chosen])
                out = self.layered.shallow(x, t, context, self.policy.cache_level, deep)
            elif self.policy.caches:
                out, deep = self.layered.full(x, t, context, self.policy.cache_level)
                for j, slot in enumerate(chosen):
                    self._deep[slot] = [*self._deep.get(slot, [])[-1:], (index, deep[j:j + 1])]
            else:
                out = self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
            for j, slot in enumerate(chosen):
                outputs[slot] = out[j].float()
        return outputs

    def _forecast(self, history: list[tuple[int, torch.Tensor]], index: int) -> torch.Tensor:
        """Deep features for step `index`: the last full call's, or (cache.forecast) the line
        through the last two, in step numbers (TaylorSeer's first order)."""
        return _linear(history, index) if self.policy.cache_forecast else history[-1][1]

    def _noise(self, image: _Image, k: int, slots: dict, outputs: dict, scheduler,
               sample: torch.Tensor, t, lam: float, guidance_scale: float,
               guided: bool) -> torch.Tensor:
        """This image's model output for the scheduler, and its bookkeeping for the step."""
        cond = outputs.get((k, COND))
        if cond is None:  # skipped: fill from the solver's history
            image.codes.append("-")
            return model_output_for(scheduler, sample[None], image.extrapolate(lam)[None],
                                    t)[0]
        halves = 2 if guided else 1
        parts = [cond] + ([outputs[(k, UNCOND)]] if (k, UNCOND) in outputs else [])
        image.cost += sum(1.0 if slots[(k, half)] else self.shallow_cost
                          for half in (COND, UNCOND)[:len(parts)]) / halves
        full = slots[(k, COND)]
        if len(parts) == 2:
            uncond = parts[1]
            image.deltas = [*image.deltas[-1:], (lam, cond - uncond)]
            image.since_uncond = 0
            noise = uncond + guidance_scale * (cond - uncond)
            if (self.policy.guidance_agree > 0 and (cond - uncond).norm()
                    < self.policy.guidance_agree * cond.norm()):
                image.cut = True
        elif guided and not image.cut:
            image.since_uncond += 1
            deltas = image.deltas if self.policy.guidance_forecast else image.deltas[-1:]
            noise = cond + (guidance_scale - 1) * _linear(deltas, lam)
        else:
            noise = cond
        letter = "F" if full else "C"
        image.codes.append(letter if len(parts) == halves else letter.lower())
        image.record(lam, predicted_x0(scheduler, sample[None], noise[None], t)[0])
        return noise


def _row(slot: tuple[int, int], batch: int, embeddings: torch.Tensor) -> int:
    """Row of `embeddings` ([uncond; cond] with guidance, cond alone without) for a slot."""
    k, half = slot
    guided = embeddings.shape[0] == 2 * batch
    return k + batch if guided and half == COND else k
