"""What every front end (CLI `generate`, prompts files, the server, bench, `compile-cache load`)
does the same way: start the engine warm from the compile cache, turn prompts into jobs with
their image indices and seeds, read the init images and masks a job starts from, and run the
jobs through the engine.

A run is a list of jobs; job i is one prompt's batch of n = num_images_per_prompt images with
global indices i*n .. i*n+n-1, drawn with the run's seeds for those indices (sdaccel.seeds), or
from the job's own seed. The plain run (prompts on the command line) and a prompts file build
their jobs here and run them with `images`; they differ only in where the images go.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdaccel.errors import ConfigError
from sdaccel.events import EventHandler, ignore
from sdaccel.seeds import image_seeds
from sdaccel.settings import GenerationSettings, HiresSettings, LoraEntry, Settings
from sdaccel.start import ImageStart

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


# A1111's default mask blur (pixels), for a mask given without one, and its slider's maximum.
DEFAULT_MASK_BLUR = 4
MAX_MASK_BLUR = 64


def read_image(data: bytes, what: str, key: str | None = None, mode: str = "RGB"):
    """The image in `data` (PNG, JPEG, WebP...) fully decoded and converted to `mode`; anything
    else, a truncated or corrupt file included, is a ConfigError naming `what` (a file, a
    request field) and carrying `key`."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # the file's structure (chunk checksums)
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # every pixel: a truncated file fails here
            return image.convert(mode)
    except Image.DecompressionBombError:
        raise ConfigError(f"{what}: the image is too large to read", key=key) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        reason = "not an image" if isinstance(exc, Image.UnidentifiedImageError) else \
            f"not a readable image ({exc or type(exc).__name__})"
        raise ConfigError(f"{what}: {reason}", key=key) from None


@dataclass(frozen=True)
class StartFile:
    """An init image or mask file a job starts from: its absolute path and the sha256 of its
    bytes (what the metadata records and resume compares)."""

    path: Path
    sha256: str

    @classmethod
    def read(cls, path: str | Path, what: str, key: str | None = None) -> StartFile:
        """The file at `path`, checked to be a complete image (errors name `what` and `path`)."""
        path = Path(path).expanduser()
        data = _read_bytes(path, what, key)
        read_image(data, f"{what} {path}", key)
        return cls(path.resolve(), hashlib.sha256(data).hexdigest())

    def image(self, what: str, mode: str = "RGB"):
        """Its pixels, as the file is now (an error if it changed since it was checked)."""
        data = _read_bytes(self.path, what, None)
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise ConfigError(f"{what} {self.path}: the file changed while the run went on")
        return read_image(data, f"{what} {self.path}", mode=mode)

    def record(self) -> dict[str, str]:
        return {"path": str(self.path), "sha256": self.sha256}


def _read_bytes(path: Path, what: str, key: str | None) -> bytes:
    if not path.is_file():
        raise ConfigError(f"{what}: {str(path)!r} " + ("is a folder, not an image file"
                                                       if path.is_dir() else "does not exist"),
                          key=key)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}", key=key) from None


@dataclass(frozen=True)
class Job:
    """One prompt's batch of images in a run; with an init image, image to image (inpainting
    with a mask) at generation.strength."""

    index: int  # the job's place in the run: its images are index*n .. index*n+n-1
    prompt: str
    negative_prompt: str
    seeds: tuple[int, ...]  # one per image, in order
    generation: GenerationSettings  # the run's generation settings with this job's overrides
    # The LoRAs of this job in place of the settings' (a prompts-file line's "loras"), else None
    loras: tuple[LoraEntry, ...] | None = None
    line: int | None = None  # 1-based line of the prompts file it came from, if one
    init_image: StartFile | None = None  # image to image from this file
    mask: StartFile | None = None  # inpainting: white is drawn again (needs init_image)
    mask_blur: int = DEFAULT_MASK_BLUR  # with a mask: its Gaussian blur radius, pixels
    hires: HiresSettings | None = None  # the hires fix in place of the settings', else None

    def __post_init__(self) -> None:
        if self.mask is not None and self.init_image is None:
            raise ConfigError("a mask needs an init image to draw on")

    @classmethod
    def at(cls, index: int, prompt: str, settings: Settings, negative_prompt: str = "",
           seed: int | None = None, generation: GenerationSettings | None = None,
           loras: Sequence[LoraEntry] | None = None, line: int | None = None,
           **start: Any) -> Job:
        """Job `index` of a run with `settings`: its images' seeds follow from settings.seed
        and the index, or start at the job's own `seed`. `start`: init_image, mask, mask_blur,
        hires (the fields of the same names)."""
        n = settings.generation.num_images_per_prompt
        seeds = image_seeds(seed, n) if seed is not None else image_seeds(
            settings.seed, n, first=index * n)
        return cls(index, prompt, negative_prompt, tuple(seeds),
                   settings.generation if generation is None else generation,
                   None if loras is None else tuple(loras), line, **start)

    def image_start(self) -> ImageStart | None:
        """What Engine.generate(start=...) takes: the init image (and mask) read now; None
        for text to image."""
        if self.init_image is None:
            return None
        image = self.init_image.image("init image")
        if self.mask is None:
            return ImageStart([image])
        return ImageStart([image], [self.mask.image("mask", mode="L")], self.mask_blur)

    def sources(self) -> dict[str, Any]:
        """The files it starts from, as the image metadata records them (empty: text to
        image)."""
        sources: dict[str, Any] = {}
        if self.init_image is not None:
            sources["init_image"] = self.init_image.record()
        if self.mask is not None:
            sources["mask"] = self.mask.record()
        return sources

    @property
    def seed(self) -> int:
        """The first image's seed (image j's is seed + j)."""
        return self.seeds[0]

    def image_indices(self, per_prompt: int) -> range:
        return range(self.index * per_prompt, (self.index + 1) * per_prompt)


def prompt_jobs(prompts: Sequence[str], settings: Settings, negative_prompt: str = "",
                init_images: Sequence[StartFile] = (), masks: Sequence[StartFile] = (),
                mask_blur: int = DEFAULT_MASK_BLUR) -> list[Job]:
    """The jobs of a plain run: one per prompt, in order, with the settings' size and LoRAs;
    `init_images` (and `masks`), if any, one per prompt (paired by the caller)."""
    if init_images and len(init_images) != len(prompts) or \
            masks and len(masks) != len(init_images):
        raise ValueError("one init image per prompt, and no mask or one per init image")
    return [Job.at(index, prompt, settings, negative_prompt,
                   init_image=init_images[index] if init_images else None,
                   mask=masks[index] if masks else None, mask_blur=mask_blur)
            for index, prompt in enumerate(prompts)]


def images(engine: Engine, jobs: Iterable[Job]) -> Iterator[tuple[Job, int, ImageResult]]:
    """Generate each job's batch in one engine call: (job, global image index, result) for
    every image, in order. The caller saves them (a plain run, a prompts file's manifest)."""
    per_prompt = engine.settings.generation.num_images_per_prompt
    if isinstance(jobs, Sequence):  # all known ahead: their warnings come as one
        engine.check_prompts([text for job in jobs for text in (job.prompt, job.negative_prompt)])
    for job in jobs:
        extra: dict[str, Any] = {}  # passed only when set: text to image asks for neither
        if (start := job.image_start()) is not None:
            extra["start"] = start
        if job.hires is not None:
            extra["hires"] = job.hires
        results = engine.generate([job.prompt], job.negative_prompt, seed=list(job.seeds),
                                  generation=job.generation, loras=job.loras, **extra)
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

    if not settings.compile.enabled or not settings.compile.cache:
        raise ConfigError(f"compile-cache load: preset {preset!r} has compile.enabled=false or "
                          "compile.cache=false; nothing to load")
    started = time.perf_counter()
    engine, loaded = start_engine(settings, on_event, environ)
    engine.generate([prompt or compile_cache.DEFAULT_PROMPT])
    warm_seconds = time.perf_counter() - started
    key = compile_cache.entry_key(settings, settings.generation.num_images_per_prompt)
    return WarmStart(key, loaded, warm_seconds)
