"""Where a batch starts when it starts from images: image to image and inpainting.

Plain data, no torch: front ends (CLI, prompts files, the server) build an ImageStart from the
files or request fields they were given and hand it to `Engine.generate(..., start=...)`; the
strength is `generation.strength`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ImageStart:
    """Init images (PIL), one per prompt of the batch or one for all, and optional masks (white:
    draw again, black: keep; the same count as the images)."""

    images: Sequence  # PIL.Image.Image
    masks: Sequence | None = None
    mask_blur: int = 0  # Gaussian blur radius (pixels) applied to each mask first, as A1111

    def for_prompts(self, count: int) -> ImageStart:
        """This start with one image (and mask) per prompt: a single one serves them all."""
        if len(self.images) == count:
            return self
        if len(self.images) != 1:
            raise ValueError(f"{len(self.images)} init images for {count} prompts: give one, "
                             "or one per prompt")
        masks = None if self.masks is None else list(self.masks) * count
        return ImageStart(list(self.images) * count, masks, self.mask_blur)
