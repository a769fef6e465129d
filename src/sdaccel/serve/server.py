"""The server's state, one object every route reads: the settings and limits it was started
with, the models (the one it started with, a models folder's), the engine (started once, by the
app's lifespan or before it; another on a model switch), the batcher that feeds it, the
metrics, the running batch's preview and the recent images of the gallery.

The engine runs on the batcher's single worker thread; request handlers only queue jobs and
await their futures, so a slow or vanished client never holds the engine.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gc
import io
import itertools
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from sdaccel import runs
from sdaccel.engine.lora.tags import LORA_TAG
from sdaccel.errors import ConfigError, SdaccelError
from sdaccel.events import EventHandler, StepDone, Warning
from sdaccel.seeds import image_seeds
from sdaccel.serve.batcher import Batcher, Interrupted, Job, Skipped
from sdaccel.serve.checks import BadRequest, JobParams, Limits, refused
from sdaccel.serve.models import ModelInfo, find_model, fitting_embeddings, started_model
from sdaccel.serve.models_dir import ModelsDir, lora_tags
from sdaccel.settings import EmbeddingEntry, LoraEntry, Settings
from sdaccel.start import ImageStart

# (settings, on_event) -> (engine, anything): sdaccel.runs.start_engine, or a test's fake
EngineStart = Callable[[Settings, EventHandler], tuple[Any, Any]]
RECENT = 48  # images the gallery keeps
log = logging.getLogger("sdaccel.serve")


@dataclass
class Metrics:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    images: int = 0
    batches: dict[int, int] = field(default_factory=dict)  # images per batch -> count
    batch_seconds: float = 0.0
    errors: int = 0

    def batch(self, images: int, seconds: float) -> None:
        self.batches[images] = self.batches.get(images, 0) + 1
        self.batch_seconds += seconds

    def request(self, path: str, status: int) -> None:
        self.requests[path, status] = self.requests.get((path, status), 0) + 1

    def prometheus(self, queue_depth: int) -> str:
        lines = ["# TYPE sdaccel_requests_total counter"]
        lines += [f'sdaccel_requests_total{{path="{path}",status="{status}"}} {count}'
                  for (path, status), count in sorted(self.requests.items())]
        lines += ["# TYPE sdaccel_images_total counter", f"sdaccel_images_total {self.images}",
                  "# TYPE sdaccel_queue_images gauge", f"sdaccel_queue_images {queue_depth}",
                  "# TYPE sdaccel_batches_total counter"]
        lines += [f'sdaccel_batches_total{{images="{n}"}} {count}'
                  for n, count in sorted(self.batches.items())]
        lines += ["# TYPE sdaccel_batch_seconds_total counter",
                  f"sdaccel_batch_seconds_total {self.batch_seconds:.3f}",
                  "# TYPE sdaccel_errors_total counter", f"sdaccel_errors_total {self.errors}"]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class LoadModel:
    """A job's params that loads a model instead of drawing (a switch): it rides alone."""

    model: ModelInfo


class Server:
    """Models served: `start()` builds the first engine with `start_engine(settings, on_event)`
    (once) and the batcher; `close()` stops the batcher. With a models folder, `switch` and
    per-request checkpoints load another engine on the batcher's thread, between batches (one
    engine at a time: the old one is let go first)."""

    def __init__(self, settings: Settings, limits: Limits | None = None,
                 api_key: str | None = None, start_engine: EngineStart = runs.start_engine,
                 on_notice: Callable[[str], None] = lambda message: None,
                 models_dir: ModelsDir | None = None) -> None:
        self.settings, self.limits, self.api_key = settings, limits or Limits(), api_key
        self.models_dir = models_dir
        self.metrics = Metrics()
        self.recent: list[dict[str, Any]] = []  # the gallery: newest last
        self.engines: dict[str, Any] = {}  # model title -> its engine (one at a time)
        self.started: ModelInfo | None = None  # the model it started with
        self.current: ModelInfo | None = None  # what requests run on unless they say
        self.loading: str | None = None  # the title of a model loading now
        self.preview: str | None = None  # base64 PNG of a step of the running batch
        self.batcher: Batcher | None = None
        self._start_engine, self._on_notice = start_engine, on_notice
        self._numbers = itertools.count()
        self._models: dict[str, ModelInfo] = {}  # every model a request has named, by title
        self._want_preview = threading.Event()
        self._running: Any = None  # the engine of the running batch
        self._fits: dict[str, list[EmbeddingEntry]] = {}  # model_id -> the folder's that fit

    def start(self) -> None:
        """Build the engine, warm from the compile cache, unless built already; and a batcher
        unless one runs."""
        if self.started is None:
            engine = self._build(self.settings.model_id)
            self.started = self.current = started_model(engine, self.settings.model_id,
                                                        self.models_dir)
            self._models[self.started.title] = self.started
            self.engines[self.started.title] = engine
        if self.batcher is None:
            self.batcher = Batcher(self._run, self.limits.max_batch,
                                   self.limits.max_wait_ms / 1000, self.limits.max_queue,
                                   on_batch=self.metrics.batch)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None

    @property
    def engine(self) -> Any:
        """The current model's engine (None while another loads in its place)."""
        return self.engines.get(self.current.title) if self.current else None

    @property
    def model_name(self) -> str:
        return self.current.model_name

    @property
    def model_hash(self) -> str | None:
        return self.current.hash

    # ------------------------------------------------------------------ models

    def model_for(self, name: Any, field: str) -> ModelInfo:
        """The model a request names (None or "": the current one); BadRequest on `field`
        with the valid names."""
        if name in (None, "") or name in (self.current.title, self.current.model_name):
            return self.current
        model = find_model(name, self.started, self.models_dir, field)
        self._models[model.title] = model
        return model

    def model(self, title: str) -> ModelInfo:
        """A model a request ran on, by title."""
        return self._models[title]

    def prompt_loras(self, prompt: str, disabled: bool = False
                     ) -> tuple[str, tuple[LoraEntry, ...] | None]:
        """The prompt without its `<lora:name:weight>` tags, and the LoRAs for its engine call
        (the settings' own and the tags', looked up in the models folder; None: no tags).
        `disabled` (A1111's disable_extra_networks): the tags are dropped, not applied."""
        if disabled:
            return LORA_TAG.sub("", prompt), None
        try:
            text, entries = lora_tags(prompt, self.models_dir)
        except ValueError as exc:  # NameNotFound (unknown, refused, no folder), a bad weight
            raise BadRequest("prompt", str(exc)) from None
        return text, (*self.settings.loras, *entries) if entries else None

    async def engine_for(self, model: ModelInfo, field: str = "sd_model_checkpoint") -> Any:
        """`model`'s engine, loaded (between batches, in arrival order) if it is not. Hold it
        no longer than the request's checks need: a switch lets it go."""
        if (engine := self.engines.get(model.title)) is not None:
            return engine
        job = Job(("load", model.title), "", [0], LoadModel(model))  # counts as one job
        self.batcher.submit([job])
        try:
            return (await asyncio.wrap_future(job.future))[0]
        except (ConfigError, SdaccelError) as exc:
            raise BadRequest(field, f"{model.title!r} could not be loaded: {exc}") from None

    async def switch(self, name: Any) -> None:
        """Make `name` the current model (options' sd_model_checkpoint): requests already
        queued finish on the old one; the new one serves once loaded."""
        model = self.model_for(name, "sd_model_checkpoint")
        if model == self.current:
            return
        previous, self.current = self.current, model
        try:
            await self.engine_for(model)
        except BadRequest:
            self.current = previous
            raise

    def _settings_for(self, model_id: str) -> Settings:
        """The settings of an engine for `model_id`: the server's, with the models folder's
        embeddings that model takes (learnt when it first loads)."""
        if model_id == self.settings.model_id and not self._fits.get(model_id):
            return self.settings
        return self.settings.model_copy(update={"model_id": model_id, "embeddings": [
            *self.settings.embeddings, *self._fits.get(model_id, [])]})

    def _build(self, model_id: str) -> Any:
        """An engine for `model_id`. The first time, the folder's embeddings that fit are
        learnt from the model itself (A1111 skips the others): a folder with such embeddings
        builds the engine twice then, once."""
        known = model_id in self._fits
        engine, _ = self._start_engine(self._settings_for(model_id), self._on_event)
        if not known:
            self._fits[model_id] = fitting_embeddings(engine, self.models_dir,
                                                      self.settings.embeddings)
            if self._fits[model_id]:
                del engine
                _release_memory()
                engine, _ = self._start_engine(self._settings_for(model_id), self._on_event)
        return engine

    def _load(self, model: ModelInfo) -> Any:
        """On the batcher's thread: `model`'s engine, built after letting the others go."""
        engine = self.engines.get(model.title)
        if engine is None:
            self.loading = model.title
            try:
                self.engines.clear()
                _release_memory()
                engine = self._build(model.model_id)
                self.engines[model.title] = engine
            finally:
                self.loading = None
        return engine

    # ------------------------------------------------------------------ the batcher's side

    def _on_event(self, event) -> None:
        if isinstance(event, StepDone) and self.batcher is not None:
            self.batcher.step_done(event.step, event.total_steps)  # where an interrupt stops
        elif isinstance(event, Warning):
            self._on_notice(event.message)

    def _on_step(self, state) -> None:
        """After every step: a preview of the batch's first image when one was asked for."""
        if self._want_preview.is_set() and self._running is not None:
            self._want_preview.clear()
            try:
                self.preview = png_base64(self._running.decode(state.latents[:1])[0])
            except Exception:  # a preview never stops a batch
                log.debug("preview failed", exc_info=True)

    def want_preview(self) -> None:
        """Decode the running batch's latents at its next step (progress' current_image)."""
        self._want_preview.set()

    def _run(self, jobs: list[Job]) -> list[list[Any]]:
        """One engine call for a batch of compatible jobs: one list of results per job."""
        params = jobs[0].params
        if isinstance(params, LoadModel):
            engine = self._load(params.model)
            return [[engine] for _ in jobs]
        engine = self._load(self._models[params.model])
        prompts = [job.prompt for job in jobs for _ in job.seeds]
        seeds = [seed for job in jobs for seed in job.seeds]
        generation = params.generation.model_copy(update={"num_images_per_prompt": 1})
        extra = {name: value for name, value in (("start", _merged_start(jobs)),
                                                 ("hires", params.hires)) if value is not None}
        self._running, self.preview = engine, None
        self._want_preview.clear()  # asked for before this batch: its first steps are noise
        try:
            results = engine.generate(prompts, params.negative_prompt, seed=seeds,
                                      generation=generation, sampler=params.sampler,
                                      loras=params.loras, on_step=self._on_step, **extra)
        finally:
            self._running = None
        self.metrics.images += len(results)
        out, start = [], 0
        for job in jobs:
            out.append(results[start:start + job.images])
            start += job.images
        return out

    # ------------------------------------------------------------------ the routes' side

    async def generate(self, prompt: str, seed: int, per_batch: int, batches: int,
                       params: JobParams, chunks: int, start: ImageStart | None = None
                       ) -> list[Any] | None:
        """`batches` batches of `per_batch` images of `prompt`, the run's seeds from `seed`
        (A1111's n_iter x batch_size), each batch from `start` if given; None when
        interrupted (a skipped batch's images are left out). `chunks`: the prompt's chunk
        count (engine.prompts.chunk_count): prompts of one batch are padded to its longest (in
        75-token chunks), which would change the shorter ones, so only prompts of the same
        count share a batch."""
        jobs = [Job((*params.key(), chunks), prompt,
                    image_seeds(seed, per_batch, first=b * per_batch), params, start)
                for b in range(batches)]
        self.batcher.submit(jobs)
        parts = await asyncio.gather(*(asyncio.wrap_future(job.future) for job in jobs),
                                     return_exceptions=True)
        results = []
        for part in parts:
            if isinstance(part, Skipped):
                continue
            if isinstance(part, Interrupted):
                return None
            if isinstance(part, ConfigError):  # e.g. a size the model cannot take
                raise refused(part)
            if isinstance(part, BaseException):
                self.metrics.errors += 1
                raise part
            results += part
        return results

    def keep(self, results, params: JobParams, save: bool,
             finish: Callable[[int, Any], Any] | None = None) -> list[dict[str, Any]]:
        """Each result (its image through `finish(index, image)` if given) as PNG bytes with
        the CLI's metadata, saved like the CLI if asked, and added to the gallery."""
        from sdaccel.outputs import RunWriter, image_metadata

        model = self._models[params.model]
        update: dict[str, Any] = {"generation": params.generation, "sampler": params.sampler}
        if params.hires is not None:
            update["hires"] = params.hires
        job_settings = self._settings_for(model.model_id).model_copy(update=update)
        kept = []
        writer = RunWriter(job_settings, model.model_name, model.hash) if save else None
        for index, result in enumerate(results):
            if finish is not None:
                result = dataclasses.replace(result, image=finish(index, result.image))
            info, parameters, png_info = image_metadata(result, job_settings, model.model_name,
                                                        model.hash)
            buffer = io.BytesIO()
            result.image.save(buffer, format="PNG", pnginfo=png_info)
            item = {**info, "parameters": parameters,
                    "png_base64": base64.b64encode(buffer.getvalue()).decode()}
            if writer is not None:
                item["path"] = writer.save(result)["path"]
            self.recent.append({**item, "number": next(self._numbers),
                                "time": time.strftime("%H:%M:%S")})
            del self.recent[:-RECENT]
            kept.append(item)
        return kept

    def queued(self) -> int:
        return self.batcher.queued() if self.batcher is not None else 0


def _merged_start(jobs: list[Job]) -> ImageStart | None:
    """The jobs' init images (and masks) as one start for their engine call: one per image."""
    if jobs[0].start is None:
        return None
    starts = [job.start.for_prompts(job.images) for job in jobs]
    masks = None if starts[0].masks is None else [m for s in starts for m in s.masks]
    return ImageStart([i for s in starts for i in s.images], masks, starts[0].mask_blur)


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _release_memory() -> None:
    """Free what a let-go engine held (its GPU memory too, where torch is loaded)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def server_of(request: Request) -> Server:
    """The routes' dependency: the state of the app the request came to."""
    return request.app.state.server


ServerDep = Annotated[Server, Depends(server_of)]  # a route's `server` argument
