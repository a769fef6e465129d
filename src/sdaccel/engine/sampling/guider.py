"""The guider: one step's model evaluation, whatever the step policy asked for.

A step policy names *slots*, (image, half) pairs with half COND or UNCOND, each marked full
(the whole UNet) or shallow (feature caching: the shallow branch on deep features kept from the
slot's last full call). The guider lays the slots out as UNet rows (unconditional rows first, as
StableDiffusionPipeline batches [uncond; cond], so an all-full step is the pipeline's call bit
for bit), runs at most one full and one shallow call, and combines the halves with
classifier-free guidance. It is the one place that knows the UNet's precision, the row layout of
the text conditioning, the guidance formula and the feature cache.

Every UNet call goes through `UNetInput -> noise` callables that `unet_wrappers` may wrap
(k-diffusion's model wrappers, ComfyUI's unet wrappers): to watch, time, perturb or replace the
model without touching the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

COND, UNCOND = 1, 0
Slot = tuple[int, int]  # (image's row in the batch, COND or UNCOND)


@dataclass(frozen=True)
class UNetInput:
    """One UNet call, as a wrapper sees it."""

    sample: torch.Tensor  # the scaled model input, one row per slot, in the UNet's dtype
    timestep: torch.Tensor
    context: torch.Tensor  # each row's text conditioning
    slots: tuple[Slot, ...]  # the (image, half) of each row
    step: int  # the index of the step in its plan (0-based)
    shallow: bool = False  # feature caching: the shallow branch on cached deep features
    added: dict[str, torch.Tensor] | None = None  # SDXL's added conditioning of each row


UNetCall = Callable[[UNetInput], torch.Tensor]
UNetWrapper = Callable[[UNetCall], UNetCall]


class FeatureCache:
    """The UNet layer by layer (feature_cache.LayeredUNet) and the deep features of each slot's
    last two full calls, for shallow calls at `level`."""

    def __init__(self, layered, level: int, forecast: bool) -> None:
        self.layered, self.level, self.forecast = layered, level, forecast
        self.deep: dict[Slot, list[tuple[int, torch.Tensor]]] = {}

    def last_full(self, slot: Slot) -> int | None:
        """The step of this slot's last full call; None before its first."""
        history = self.deep.get(slot)
        return history[-1][0] if history else None

    def full(self, call: UNetInput) -> torch.Tensor:
        out, deep = self.layered.full(call.sample, call.timestep, call.context, self.level,
                                      call.added)
        for j, slot in enumerate(call.slots):
            self.deep[slot] = [*self.deep.get(slot, [])[-1:], (call.step, deep[j:j + 1])]
        return out

    def shallow(self, call: UNetInput) -> torch.Tensor:
        deep = torch.cat([self._features(self.deep[slot], call.step) for slot in call.slots])
        return self.layered.shallow(call.sample, call.timestep, call.context, self.level, deep,
                                    call.added)

    def _features(self, history: list[tuple[int, torch.Tensor]], index: int) -> torch.Tensor:
        """Deep features for step `index`: the last full call's, or (forecast) the line through
        the last two, in step numbers (TaylorSeer's first order)."""
        return linear(history, index) if self.forecast else history[-1][1]


def linear(points: list[tuple[float, torch.Tensor]], at: float) -> torch.Tensor:
    """The line through the last two (position, value) points, at `at`; the last value alone
    when there is one point."""
    if len(points) < 2:
        return points[-1][1]
    (p_b, v_b), (p_a, v_a) = points[-2:]
    return v_a + (v_a - v_b) * ((at - p_a) / (p_a - p_b))


@dataclass(frozen=True)
class _Rows:
    """One UNet call's rows: of the model input, of the conditioning, the batch's images, and
    the (image, half) slot of each."""

    sample: torch.Tensor
    context: torch.Tensor
    images: torch.Tensor
    slots: tuple[Slot, ...]


class Guider:
    """Evaluates the model for the slots a step policy chose, for one batch."""

    def __init__(self, unet_forward: Callable, unet_dtype: torch.dtype, embeddings: torch.Tensor,
                 batch: int, guidance_scale: float, wrappers: Sequence[UNetWrapper] = (),
                 cache: FeatureCache | None = None, shallow_cost: float = 1.0,
                 extra: torch.Tensor | None = None,
                 added: dict[str, torch.Tensor] | None = None) -> None:
        """`embeddings`: [uncond; cond] rows when guided, cond rows alone otherwise (whoever
        encoded the prompts chose); `shallow_cost`: a shallow call's FLOPs over a full one's;
        `extra`: channels appended to each image's UNet input (an inpainting UNet's mask and
        masked image latents), one row per image of the batch; `added`: the UNet's added
        conditioning (SDXL: pooled text, size), rows as `embeddings`'."""
        self.unet_forward, self.unet_dtype = unet_forward, unet_dtype
        self.embeddings, self.batch = embeddings, batch
        self.guided = embeddings.shape[0] == 2 * batch
        self.guidance_scale = guidance_scale
        self.cache, self.shallow_cost, self.extra = cache, shallow_cost, extra
        self.added = added
        self.halves = (COND, UNCOND) if self.guided else (COND,)
        self._layouts: dict[tuple, _Rows] = {}
        call = self._call_unet
        for wrap in wrappers:
            call = wrap(call)
        self._call = call

    def all_full(self, rows: int) -> dict[Slot, bool]:
        """Every half of every row, full: the plain step."""
        return {(k, half): True for k in range(rows) for half in self.halves}

    def evaluate(self, model_input: torch.Tensor, t, slots: dict[Slot, bool],
                 positions: torch.Tensor, index: int) -> dict[Slot, torch.Tensor]:
        """Run the full and the shallow slots (one call each) on `model_input` (the scaled
        latents of the images at `positions` of the batch; slots count rows of it); slot ->
        its fp32 output."""
        outputs: dict[Slot, torch.Tensor] = {}
        images = tuple(positions.tolist())
        for full in (True, False):
            chosen = tuple(sorted((s for s, f in slots.items() if f == full),
                                  key=lambda s: (s[1], s[0])))
            if not chosen:
                continue
            rows = self._rows(chosen, images)
            sample = model_input[rows.sample]
            if self.extra is not None:
                sample = torch.cat([sample, self.extra[rows.images].to(sample.dtype)], dim=1)
            added = None if self.added is None else {
                name: value[rows.context] for name, value in self.added.items()}
            out = self._call(UNetInput(sample, t, self.embeddings[rows.context], rows.slots,
                                       index, not full, added))
            outputs.update(zip(chosen, out.float(), strict=True))  # rows of one fp32 tensor
        return outputs

    def combine(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance: the one place it is written."""
        return uncond + self.guidance_scale * (cond - uncond)

    def cost(self, slots: dict[Slot, bool], row: int) -> float:
        """A row's UNet work at a step, in full (guided) calls of one image."""
        return sum(1.0 if slots[(row, half)] else self.shallow_cost
                   for half in self.halves if (row, half) in slots) / len(self.halves)

    def _rows(self, chosen: tuple[Slot, ...], images: tuple[int, ...]) -> _Rows:
        """Where the chosen slots' rows come from, worked out once per layout: a plain run
        asks for the same one at every step."""
        key = (chosen, images)
        if key not in self._layouts:
            device = self.embeddings.device
            slots = tuple((images[k], half) for k, half in chosen)
            self._layouts[key] = _Rows(
                torch.tensor([k for k, _ in chosen], device=device),
                torch.tensor([self._context_row(image, half) for image, half in slots],
                             device=device),
                torch.tensor([image for image, _ in slots], device=device), slots)
        return self._layouts[key]

    def _context_row(self, image: int, half: int) -> int:
        return image + self.batch if self.guided and half == COND else image

    def _call_unet(self, call: UNetInput) -> torch.Tensor:
        """The innermost call: the UNet (compiled, its attention kernel forced), or the layered
        one when features are cached."""
        if call.shallow:
            return self.cache.shallow(call)
        if self.cache is not None:
            return self.cache.full(call)
        extra = {} if call.added is None else {"added_cond_kwargs": call.added}
        return self.unet_forward(call.sample, call.timestep, encoder_hidden_states=call.context,
                                 return_dict=False, **extra)[0]
