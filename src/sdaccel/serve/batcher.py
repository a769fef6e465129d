"""Concurrent requests -> engine batches, on one worker thread.

Each request is split into jobs (one per A1111 `n_iter` batch). The worker always starts with the
oldest waiting job (so requests that cannot merge are served in arrival order), then adds every
waiting job with the same key (model, size, sampler, steps, guidance, negative prompt, LoRAs,
hires fix, whether it starts from images; a model load is a job of its own) until the batch
holds `max_batch` images, waiting up to `max_wait` seconds for more to arrive, but only while
requests come concurrently (the last batch had company, or a request arrived while it ran): a
lone client's requests start at once. The batch runs as
one engine call in which every image keeps its own seed, so it is the image it would be alone.
The queue holds at most `max_queue` images; past that, `submit` refuses at once (the server
answers 503 with Retry-After) instead of letting clients hang.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue holds `max_queue` images already."""


class Interrupted(Exception):
    """The batch was stopped by /sdapi/v1/interrupt."""


class Skipped(Interrupted):
    """The batch was stopped by /sdapi/v1/skip: its request goes on with its other batches."""


@dataclass
class Job:
    key: Hashable  # jobs with equal keys can share one engine call
    prompt: str
    seeds: list[int]  # one per image
    params: Any  # what the engine call needs besides prompt and seeds (same for equal keys)
    start: Any = None  # this job's own init images (an ImageStart), if it starts from images
    future: Future = field(default_factory=Future)

    @property
    def images(self) -> int:
        return len(self.seeds)


@dataclass
class Progress:
    """What /sdapi/v1/progress reports: the running batch's step, and the queue."""

    step: int = 0
    steps: int = 0
    batch_images: int = 0
    started: float | None = None
    queued_images: int = 0
    interrupted: bool = False  # the running batch was interrupted
    skipped: bool = False  # ... or skipped

    def fraction(self) -> float:
        """Of the running batch; 0 when none runs (clients wait for 0 and no jobs)."""
        return self.step / self.steps if self.steps and self.started is not None else 0.0

    def eta(self) -> float:
        done = self.fraction()
        if self.started is None or done <= 0:
            return 0.0
        elapsed = time.perf_counter() - self.started
        return elapsed / done - elapsed


class Batcher:
    """Runs `generate(jobs) -> one list of results per job` on a worker thread."""

    def __init__(self, generate: Callable[[list[Job]], list[list[Any]]], max_batch: int,
                 max_wait: float, max_queue: int,
                 on_batch: Callable[[int, float], None] = lambda images, seconds: None) -> None:
        self._generate, self._on_batch = generate, on_batch
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        self._waiting: list[Job] = []
        self._ready = threading.Condition()
        self._interrupt = threading.Event()
        self._skip = threading.Event()
        self._stopped = False
        # Wait for company only while requests come concurrently; assumed at the start.
        self._company = True
        self._running = False
        self.progress = Progress()
        self._thread = threading.Thread(target=self._work, name="sdaccel-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ front end

    def submit(self, jobs: list[Job]) -> None:
        """Queue a request's jobs, all or none."""
        with self._ready:
            queued = sum(job.images for job in self._waiting)
            if queued + sum(job.images for job in jobs) > self.max_queue:
                raise QueueFull(f"{queued} images are queued (limit {self.max_queue})")
            self._waiting.extend(jobs)
            self._company = self._company or self._running
            self.progress.queued_images = queued + sum(job.images for job in jobs)
            self._ready.notify()

    def interrupt(self) -> None:
        """Stop the running batch at its next step (its requests get Interrupted)."""
        self.progress.interrupted = True
        self._interrupt.set()

    def skip(self) -> None:
        """Stop the running batch at its next step (its jobs get Skipped)."""
        self.progress.skipped = True
        self._skip.set()

    def step_done(self, step: int, total: int) -> None:
        """The engine's step events: progress, and where an interrupt or skip takes effect."""
        self.progress.step, self.progress.steps = step, total
        if self._interrupt.is_set():
            raise Interrupted("interrupted")
        if self._skip.is_set():
            raise Skipped("skipped")

    def queued(self) -> int:
        with self._ready:
            return sum(job.images for job in self._waiting)

    def close(self) -> None:
        with self._ready:
            self._stopped = True
            self._ready.notify()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[Job] | None:
        with self._ready:
            while not self._waiting and not self._stopped:
                self._ready.wait()
            if self._stopped:
                return None
            batch = [self._waiting.pop(0)]
            deadline = time.monotonic() + (self.max_wait if self._company else 0.0)
            while True:
                self._take_compatible(batch)
                left = deadline - time.monotonic()
                if sum(job.images for job in batch) >= self.max_batch or left <= 0:
                    break
                self._ready.wait(left)
            self._company = len(batch) > 1 or bool(self._waiting)
            self._running = True
            self.progress.queued_images = sum(job.images for job in self._waiting)
            return batch

    def _take_compatible(self, batch: list[Job]) -> None:
        room = self.max_batch - sum(job.images for job in batch)
        for job in list(self._waiting):
            if job.key == batch[0].key and job.images <= room:
                self._waiting.remove(job)
                batch.append(job)
                room -= job.images

    def _run(self, batch: list[Job]) -> None:
        images = sum(job.images for job in batch)
        self._interrupt.clear()
        self._skip.clear()
        self.progress.interrupted = self.progress.skipped = False
        self.progress.step, self.progress.steps = 0, 0
        self.progress.batch_images, self.progress.started = images, time.perf_counter()
        try:
            results = self._generate(batch)
        except Exception as exc:  # every waiting request hears of it; the worker goes on
            for job in batch:
                job.future.set_exception(exc)
        else:
            for job, result in zip(batch, results, strict=True):
                job.future.set_result(result)
        finally:
            with self._ready:
                self._running = False
            self._on_batch(images, time.perf_counter() - self.progress.started)
            self.progress.batch_images, self.progress.started = 0, None
