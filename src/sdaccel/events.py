"""Typed events the engine emits while it works; front ends render them, the engine never prints.

An event handler is any callable taking one event. Events are small frozen dataclasses so that a
renderer can match on their type and a JSON writer can dump them with dataclasses.asdict().
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchStarted:
    """A batch of images (one prompt x num_images_per_prompt, or several prompts) begins."""

    batch_size: int
    steps: int  # UNet calls in the plan (StepDone's total_steps)
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class StepDone:
    """A step of the plan finished for `batch_size` images (a group, once adaptive plans split
    it). Steps here are UNet calls: one a solver step, but Heun's 2n - 1 for n steps."""

    step: int  # 1-based
    total_steps: int
    batch_size: int
    # What ran for each image of the group at this step, one letter each: F full UNet, C cached
    # deep features (shallow branch only), f/c the same without the unconditional half,
    # - skipped (see engine/sampling/stepwise.py).
    decisions: str = ""
    costs: tuple[float, ...] = ()  # each image's UNet work so far, in full-UNet equivalents


@dataclass(frozen=True)
class PlanDecided:
    """Adaptive steps: after the warm-up, one image's uncertainty score and its chosen total."""

    prompt: str
    seed: int
    method: str
    score: float
    warmup_steps: int
    total_steps: int  # warm-up included
    max_steps: int


@dataclass(frozen=True)
class BatchDone:
    batch_size: int
    steps: int
    seconds: float


@dataclass(frozen=True)
class Warning:  # noqa: A001 - the engine's own kind of warning, shown by the front end
    message: str


Event = BatchStarted | StepDone | PlanDecided | BatchDone | Warning
EventHandler = Callable[[Event], None]


def ignore(_event: Event) -> None:
    """The default handler: a library user who does not listen loses nothing."""
