"""The server's state, one object every route reads: the settings and limits it was started
with, the engine (started once, by the app's lifespan or before it), the batcher that feeds it,
the metrics and the recent images of the gallery.

The engine runs on the batcher's single worker thread; request handlers only queue jobs and
await their futures, so a slow or vanished client never holds the engine.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from sdaccel import runs
from sdaccel.errors import ConfigError
from sdaccel.events import EventHandler, StepDone, Warning
from sdaccel.seeds import image_seeds
from sdaccel.serve.batcher import Batcher, Interrupted, Job
from sdaccel.serve.checks import JobParams, Limits, refused
from sdaccel.settings import Settings

# (settings, on_event) -> (engine, anything): sdaccel.runs.start_engine, or a test's fake
EngineStart = Callable[[Settings, EventHandler], tuple[Any, Any]]
RECENT = 48  # images the gallery keeps


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


class Server:
    """One model served: `start()` builds the engine with `start_engine(settings, on_event)`
    (once) and the batcher; `close()` stops the batcher."""

    def __init__(self, settings: Settings, limits: Limits | None = None,
                 api_key: str | None = None, start_engine: EngineStart = runs.start_engine,
                 on_notice: Callable[[str], None] = lambda message: None) -> None:
        self.settings, self.limits, self.api_key = settings, limits or Limits(), api_key
        self.metrics = Metrics()
        self.recent: list[dict[str, Any]] = []  # the gallery: newest last
        self.engine: Any = None
        self.batcher: Batcher | None = None
        self._start_engine, self._on_notice = start_engine, on_notice
        self._numbers = itertools.count()

    def start(self) -> None:
        """Build the engine, warm from the compile cache, unless built already; and a batcher
        unless one runs."""
        if self.engine is None:
            self.engine, _ = self._start_engine(self.settings, self._on_event)
        if self.batcher is None:
            self.batcher = Batcher(self._run, self.limits.max_batch,
                                   self.limits.max_wait_ms / 1000, self.limits.max_queue,
                                   on_batch=self.metrics.batch)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None

    @property
    def model_name(self) -> str:
        return self.engine.components.name

    @property
    def model_hash(self) -> str | None:
        return self.engine.components.model_hash

    def _on_event(self, event) -> None:
        if isinstance(event, StepDone) and self.batcher is not None:
            self.batcher.step_done(event.step, event.total_steps)  # where an interrupt stops
        elif isinstance(event, Warning):
            self._on_notice(event.message)

    def _run(self, jobs: list[Job]) -> list[list[Any]]:
        """One engine call for a batch of compatible jobs: one list of results per job."""
        params: JobParams = jobs[0].params
        prompts = [job.prompt for job in jobs for _ in job.seeds]
        seeds = [seed for job in jobs for seed in job.seeds]
        generation = params.generation.model_copy(update={"num_images_per_prompt": 1})
        results = self.engine.generate(prompts, params.negative_prompt, seed=seeds,
                                       generation=generation, sampler=params.sampler)
        self.metrics.images += len(results)
        out, start = [], 0
        for job in jobs:
            out.append(results[start:start + job.images])
            start += job.images
        return out

    async def generate(self, prompt: str, seed: int, per_batch: int, batches: int,
                       params: JobParams) -> list[Any] | None:
        """`batches` batches of `per_batch` images of `prompt`, the run's seeds from `seed`
        (A1111's n_iter x batch_size); None when interrupted."""
        # Prompts of one batch are padded to its longest (in 75-token chunks), which would
        # change the shorter ones: only prompts of the same chunk count share a batch.
        chunks = self.engine.prompts.chunk_count(prompt, params.negative_prompt)
        jobs = [Job((*params.key(), chunks), prompt,
                    image_seeds(seed, per_batch, first=b * per_batch), params)
                for b in range(batches)]
        self.batcher.submit(jobs)
        try:
            parts = await asyncio.gather(*(asyncio.wrap_future(job.future) for job in jobs))
        except Interrupted:
            return None
        except ConfigError as exc:  # e.g. a size the model cannot take
            raise refused(exc) from None
        except Exception:
            self.metrics.errors += 1
            raise
        return [result for part in parts for result in part]

    def keep(self, results, params: JobParams, save: bool) -> list[dict[str, Any]]:
        """Each result as PNG bytes with the CLI's metadata, saved like the CLI if asked, and
        added to the gallery."""
        from sdaccel.outputs import RunWriter, image_metadata

        job_settings = self.settings.model_copy(update={"generation": params.generation,
                                                        "sampler": params.sampler})
        kept = []
        writer = RunWriter(job_settings, self.model_name, self.model_hash) if save else None
        for result in results:
            info, parameters, png_info = image_metadata(result, job_settings, self.model_name,
                                                        self.model_hash)
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


def server_of(request: Request) -> Server:
    """The routes' dependency: the state of the app the request came to."""
    return request.app.state.server


ServerDep = Annotated[Server, Depends(server_of)]  # a route's `server` argument
