"""The bundled "shapes" model: a procedural data set, its tokenizer, training and judge.

``bundled:shapes`` is a small Stable-Diffusion-architecture model trained on this data set
(see ``sdaccel/bundled/shapes/README.md``). Submodules are imported lazily so that importing
``sdaccel.shapes`` does not import torch.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled" / "shapes"

__all__ = ["BUNDLED_DIR"]
