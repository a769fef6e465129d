"""The bundled "shapes" model's data set and judge: what bench, metrics and the examples read.

``bundled:shapes`` is a small Stable-Diffusion-architecture model trained on this data set (see
``sdaccel/bundled/shapes/README.md``); the training code is ``sdaccel.training``, which the
runtime never imports. Submodules are imported lazily so that importing ``sdaccel.shapes`` does
not import numpy or Pillow.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled" / "shapes"

__all__ = ["BUNDLED_DIR"]
