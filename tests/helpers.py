"""What several test files share: the tiny model's settings and command-line flags.

Fixtures live in conftest.py; plain values and functions live here, imported as
`from helpers import ...` (pyproject puts tests/ on pytest's pythonpath).
"""

from __future__ import annotations

from collections.abc import Iterable

from sdaccel.settings import resolve_settings

# The random tiny model at 32x32, 4 steps, on the CPU, as settings overrides.
TINY = ["model_id=random:tiny", "generation.height=32", "generation.width=32",
        "sampler.steps=4", "device=cpu"]

# The same model and size as `sdaccel generate` flags, 2 steps (files end in `_steps2.png`).
TINY_FLAGS = ["--model", "random:tiny", "--height", "32", "--width", "32", "--steps", "2"]


def tiny_settings(*overrides: str, preset: str = "tiny"):
    """Settings for the random tiny model at 32x32, 4 steps, plus `overrides`."""
    return resolve_settings(preset, overrides=[*TINY, *overrides], environ={}).settings


def set_flags(assignments: Iterable[str]) -> list[str]:
    """`--set KEY=VALUE` for each assignment: settings overrides as command-line arguments."""
    return [arg for assignment in assignments for arg in ("--set", assignment)]
