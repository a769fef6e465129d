"""The seed schedule every front end shares (CLI runs, prompts files, the server, bench, the
engine itself): image k of a run that starts at `seed` is drawn with seed + k, so any image can be
made again alone from the seed in its metadata."""

from __future__ import annotations


def image_seeds(seed: int, count: int, first: int = 0) -> list[int]:
    """Seeds of images first .. first + count - 1 of a run that starts at `seed` (a run's n-th
    batch of b images starts at first = n * b)."""
    return [seed + first + k for k in range(count)]
