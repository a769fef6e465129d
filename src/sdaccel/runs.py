"""What every front end (CLI `generate`, prompts files, the server, bench, `compile-cache load`)
does the same way: start the engine warm from the compile cache, turn prompts into jobs with
their image indices and seeds, and run the jobs through the engine.

A run is a list of jobs; job i is one prompt's batch of n = num_images_per_prompt images with
global indices i*n .. i*n+n-1, drawn with the run's seeds for those indices (sdaccel.seeds), or
from the job's own seed. The plain run (prompts on the command line) and a prompts file build
their jobs here and run them with `images`; they differ only in where the images go.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdaccel.events import EventHandler, ignore
from sdaccel.seeds import image_seeds
from sdaccel.settings import GenerationSettings, LoraEntry, Settings

if TYPE_CHECKING:  # both import torch: loaded when an engine starts, not with this module
    from sdaccel.compile_cache import CacheEntry
    from sdaccel.engine.engine import Engine, ImageResult


def start_engine(settings: Settings, on_event: EventHandler = ignore,
                 environ: dict[str, str] | None = None) -> tuple[Engine, list[CacheEntry]]:
    """The engine for `settings`, started warm: the stored compile-cache entries that match them
    are loaded first (compile_cache.load_matching), so its first call compiles from them.
    Returns it and those entries."""
    from sdaccel.compile_cache import load_matching
    from sdaccel.engine.engine import Engine

    loaded = load_matching(settings, on_event, environ)
    return Engine(settings, on_event=on_event), loaded


@dataclass(frozen=True)
class Job:
    """One prompt's batch of images in a run."""

    index: int  # the job's place in the run: its images are index*n .. index*n+n-1
    prompt: str
    negative_prompt: str
    seeds: tuple[int, ...]  # one per image, in order
    generation: GenerationSettings  # the run's generation settings with this job's overrides
    # The LoRAs of this job in place of the settings' (a prompts-file line's "loras"), else None
    loras: tuple[LoraEntry, ...] | None = None
    line: int | None = None  # 1-based line of the prompts file it came from, if one

    @classmethod
    def at(cls, index: int, prompt: str, settings: Settings, negative_prompt: str = "",
           seed: int | None = None, generation: GenerationSettings | None = None,
           loras: Sequence[LoraEntry] | None = None, line: int | None = None) -> Job:
        """Job `index` of a run with `settings`: its images' seeds follow from settings.seed
        and the index, or start at the job's own `seed`."""
        n = settings.generation.num_images_per_prompt
        seeds = image_seeds(seed, n) if seed is not None else image_seeds(
            settings.seed, n, first=index * n)
        return cls(index, prompt, negative_prompt, tuple(seeds),
                   settings.generation if generation is None else generation,
                   None if loras is None else tuple(loras), line)

    @property
    def seed(self) -> int:
        """The first image's seed (image j's is seed + j)."""
        return self.seeds[0]

    def image_indices(self, per_prompt: int) -> range:
        return range(self.index * per_prompt, (self.index + 1) * per_prompt)


def prompt_jobs(prompts: Sequence[str], settings: Settings,
                negative_prompt: str = "") -> list[Job]:
    """The jobs of a plain run: one per prompt, in order, with the settings' size and LoRAs."""
    return [Job.at(index, prompt, settings, negative_prompt)
            for index, prompt in enumerate(prompts)]


def images(engine: Engine, jobs: Iterable[Job]) -> Iterator[tuple[Job, int, ImageResult]]:
    """Generate each job's batch in one engine call: (job, global image index, result) for
    every image, in order. The caller saves them (a plain run, a prompts file's manifest)."""
    per_prompt = engine.settings.generation.num_images_per_prompt
    if isinstance(jobs, Sequence):  # all known ahead: their warnings come as one
        engine.check_prompts([text for job in jobs for text in (job.prompt, job.negative_prompt)])
    for job in jobs:
        results = engine.generate([job.prompt], job.negative_prompt, seed=list(job.seeds),
                                  generation=job.generation, loras=job.loras)
        yield from ((job, index, result) for index, result in
                    zip(job.image_indices(per_prompt), results, strict=True))


@dataclass
class WarmStart:
    """A timed warm start (`sdaccel compile-cache load`)."""

    key: str  # the compile-cache entry of these settings' shape and batch
    loaded: list[CacheEntry]  # every entry loaded (any shape)
    warm_seconds: float  # loading + engine build + first generate

    @property
    def entry(self) -> CacheEntry | None:
        """The entry of this shape and batch, if it was loaded."""
        return next((e for e in self.loaded if e.key == self.key), None)


def warm_start(settings: Settings, preset: str, prompt: str | None = None,
               on_event: EventHandler = ignore,
               environ: dict[str, str] | None = None) -> WarmStart:
    """Load the matching compile-cache entries and time a warm start: engine build + first
    image of `prompt` (None: the compile cache's own prompt)."""
    from sdaccel import compile_cache
    from sdaccel.errors import ConfigError

    if not settings.compile.enabled or not settings.compile.cache:
        raise ConfigError(f"compile-cache load: preset {preset!r} has compile.enabled=false or "
                          "compile.cache=false; nothing to load")
    started = time.perf_counter()
    engine, loaded = start_engine(settings, on_event, environ)
    engine.generate([prompt or compile_cache.DEFAULT_PROMPT])
    warm_seconds = time.perf_counter() - started
    key = compile_cache.entry_key(settings, settings.generation.num_images_per_prompt)
    return WarmStart(key, loaded, warm_seconds)
