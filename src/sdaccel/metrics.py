"""Fidelity and alignment metrics.

- :func:`psnr`, :func:`ssim`: fidelity of an image to a reference (torchmetrics' implementations;
  data range 1.0, SSIM with the usual 11x11 Gaussian window). Identical images give ``inf`` and
  ``1.0``. Batches give the mean over images.
- :func:`alignment`, :func:`is_aligned`: for the bundled ``shapes`` model, how well images match
  their captions, read back by the rule in :mod:`sdaccel.shapes.judge`.

Accepted images: PIL images; ``uint8`` arrays/tensors in [0, 255]; float arrays/tensors in [0, 1]
(diffusers' ``output_type="np"``/``"pt"``). Layout ``HWC`` or ``CHW``, with an optional leading
batch dimension (a list of PIL images is a batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

ImageLike = Union[Image.Image, np.ndarray, "torch.Tensor", Sequence[Image.Image]]

__all__ = ["ImageLike", "alignment", "is_aligned", "psnr", "ssim", "to_tensor"]


def to_tensor(image: ImageLike) -> torch.Tensor:
    """``image`` as a float32 ``[N, C, H, W]`` tensor in [0, 1]."""
    import torch

    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        arr = np.stack([np.asarray(im.convert("RGB")) for im in image])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
    t = torch.from_numpy(np.array(image)) if isinstance(image, np.ndarray) else image.detach().cpu()
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4:
        raise ValueError(f"expected an image of 3 or 4 dimensions, got shape {tuple(t.shape)}")
    if t.shape[1] not in (1, 3) and t.shape[-1] in (1, 3):
        t = t.permute(0, 3, 1, 2)
    return t.contiguous()


def _pair(a: ImageLike, b: ImageLike) -> tuple[torch.Tensor, torch.Tensor]:
    ta, tb = to_tensor(a), to_tensor(b)
    if ta.shape != tb.shape:
        raise ValueError(f"images differ in shape: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    return ta, tb


def psnr(image: ImageLike, reference: ImageLike) -> float:
    """Peak signal-to-noise ratio in dB (higher is closer; ``inf`` for identical images)."""
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = _pair(image, reference)
    values = [
        peak_signal_noise_ratio(x[None], y[None], data_range=1.0)
        if not torch.equal(x, y)
        else torch.tensor(float("inf"))
        for x, y in zip(a, b, strict=True)
    ]
    return float(torch.stack(values).mean())


def ssim(image: ImageLike, reference: ImageLike) -> float:
    """Structural similarity in [-1, 1] (1.0 for identical images)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _pair(image, reference)
    return float(structural_similarity_index_measure(a, b, data_range=1.0))


def _pil_list(images: ImageLike) -> list[Image.Image]:
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (list, tuple)) and all(isinstance(im, Image.Image) for im in images):
        return list(images)
    t = (to_tensor(images).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(x) for x in t]


def is_aligned(image: ImageLike, caption: str) -> bool:
    """Whether a ``shapes`` image shows every attribute its caption states."""
    from sdaccel.shapes import judge

    return judge.score(_pil_list(image)[0], caption).aligned


def alignment(images: ImageLike, captions: Sequence[str]) -> dict[str, float]:
    """Per-attribute accuracy and ``aligned`` rate of ``shapes`` images against their captions.

    Keys: ``colour``, ``shape``, ``count`` (always), ``background``, ``size``, ``position`` (when
    some caption states them), ``aligned`` and ``n``. See :mod:`sdaccel.shapes.judge`.
    """
    from sdaccel.shapes import judge

    return judge.accuracy(_pil_list(images), list(captions))
