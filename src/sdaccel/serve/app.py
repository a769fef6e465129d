"""The HTTP front end: AUTOMATIC1111's API subset, our own endpoints, metrics and a gallery.

FastAPI (on Starlette, served by uvicorn): AUTOMATIC1111 itself is a FastAPI app, so its clients
already parse FastAPI's 422 bodies, and the request models are pydantic, like our settings. The
engine runs on the batcher's single worker thread; request handlers only queue jobs and await
their futures, so a slow or vanished client never holds the engine.
"""

from __future__ import annotations

import asyncio
import base64
import html
import io
import itertools
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError

from sdaccel.catalogue import SAMPLER_TABLE, SAMPLERS, SCHEDULE_LABELS
from sdaccel.errors import ConfigError
from sdaccel.serve.a1111 import Txt2ImgRequest, Unsupported, check_request, info_text, sampler_for
from sdaccel.serve.batcher import Batcher, Interrupted, Job, QueueFull
from sdaccel.settings import GenerationSettings, SamplerSettings, Settings, adaptive_problem


@dataclass(frozen=True)
class Limits:
    max_batch: int = 4  # images per engine call
    # How long a batch waits for compatible requests. 4 clients on the bundled model: 1.41x
    # the images/s of no batching at 30 ms, 1.88x at 100 ms (replies leave one by one, so
    # the clients' next requests arrive spread out; examples/serve_load.py).
    max_wait_ms: int = 100
    max_queue: int = 64  # images waiting; beyond: 503
    max_pixels: int = 1024 * 1024  # width x height of one image
    max_images: int = 16  # batch_size x n_iter of one request
    max_steps: int = 150
    max_body_bytes: int = 1 << 20


@dataclass(frozen=True)
class JobParams:
    """What a batch shares: every job with these parameters can ride in one engine call."""

    negative_prompt: str
    generation: GenerationSettings
    sampler: SamplerSettings


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


class BadRequest(ValueError):
    """A 422 naming the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def create_app(settings: Settings, limits: Limits = Limits(), api_key: str | None = None,
               on_notice: Callable[[str], None] = lambda message: None) -> FastAPI:
    """Load the engine for `settings`, warm from the compile cache (its warnings go to
    `on_notice`), and build the app."""
    from sdaccel.compile_cache import start_engine
    from sdaccel.events import StepDone, Warning

    def on_event(event) -> None:
        if isinstance(event, StepDone):
            batcher.step_done(event.step, event.total_steps)  # where an interrupt takes effect
        elif isinstance(event, Warning):
            on_notice(event.message)

    engine, _ = start_engine(settings, on_event)
    app = FastAPI(title="sdaccel", docs_url="/docs", redoc_url=None)
    app.state.engine = engine
    metrics = Metrics()
    recent: list[dict[str, Any]] = []  # the gallery: newest last
    numbers = itertools.count()
    model_name, model_hash = engine.components.name, engine.components.model_hash

    def run(jobs: list[Job]) -> list[list[Any]]:
        params: JobParams = jobs[0].params
        prompts = [job.prompt for job in jobs for _ in job.seeds]
        seeds = [seed for job in jobs for seed in job.seeds]
        generation = params.generation.model_copy(update={"num_images_per_prompt": 1})
        results = engine.generate(prompts, params.negative_prompt, seed=seeds,
                                  generation=generation, sampler=params.sampler)
        metrics.images += len(results)
        out, start = [], 0
        for job in jobs:
            out.append(results[start:start + job.images])
            start += job.images
        return out

    batcher = Batcher(run, limits.max_batch, limits.max_wait_ms / 1000, limits.max_queue,
                      on_batch=metrics.batch)
    app.state.batcher = batcher

    # ------------------------------------------------------------------ plumbing

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if api_key and path.startswith(("/sdapi", "/v1/generate")) and not _authorised(
                request, api_key):
            return _answer(metrics, path, JSONResponse(
                {"detail": "missing or wrong API key (Authorization: Bearer KEY, or basic "
                 "auth with the key as password)"}, 401, {"WWW-Authenticate": "Bearer"}))
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limits.max_body_bytes:
            return _answer(metrics, path, JSONResponse(
                {"detail": f"body: {length} bytes, limit {limits.max_body_bytes}"}, 413))
        response = await call_next(request)
        return _answer(metrics, path, response)

    async def body_of(request: Request, model: type[BaseModel]):
        raw = await request.body()
        if len(raw) > limits.max_body_bytes:
            raise BadRequest("body", f"{len(raw)} bytes, limit {limits.max_body_bytes}")
        try:
            return model.model_validate_json(raw or b"{}")
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in error["loc"]) or "body"
            raise BadRequest(where, error["msg"]) from None

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Request, exc: BadRequest):
        return JSONResponse({"detail": str(exc), "field": exc.field}, 422)

    @app.exception_handler(QueueFull)
    async def queue_full(_request: Request, exc: QueueFull):
        return JSONResponse({"detail": f"busy: {exc}"}, 503, {"Retry-After": "2"})

    # ------------------------------------------------------------------ A1111

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        body = await body_of(request, Txt2ImgRequest)
        try:
            ignored = check_request(body, model_name)
            sampler = sampler_for(body, settings.sampler)
        except Unsupported as exc:
            raise BadRequest(exc.field, str(exc)) from None
        if problem := adaptive_problem(settings.adaptive, sampler):  # the server's own mode
            raise BadRequest("sampler_name", problem)
        generation = _generation(body.width, body.height, body.cfg_scale, engine, limits)
        _check_counts(body.batch_size, body.n_iter, body.steps, limits)
        seed = body.seed if body.seed >= 0 else secrets.randbelow(2**32)
        params = JobParams(body.negative_prompt, generation,
                           sampler.model_copy(update={"steps": body.steps}))  # checked above
        results = await _generate(body.prompt, seed, body.batch_size, body.n_iter, params)
        if results is None:
            return {"images": [], "parameters": body.model_dump(), "info": json.dumps(
                {"interrupted": True, "sdaccel_ignored": ignored})}
        saved = _keep(results, params, body.save_images and not body.do_not_save_samples)
        label = SAMPLERS[sampler.name].a1111
        info = info_text(body, label, [r.seed for r in results], model_name, model_hash,
                         [s["parameters"] for s in saved], ignored)
        return {"images": [s["png_base64"] for s in saved] if body.send_images else [],
                "parameters": body.model_dump(), "info": json.dumps(info)}

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": s.a1111, "aliases": [s.name], "options": {}} for s in SAMPLER_TABLE]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():  # A1111 1.9+'s schedule types, those sampler.schedule has
        return [{"name": label.lower().replace(" ", "_"), "label": label, "aliases": None,
                 "default_rho": -1, "need_inner_model": False}
                for label in SCHEDULE_LABELS.values()]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [{"title": model_name, "model_name": model_name, "hash": model_hash,
                 "sha256": None,
                 "filename": model_name, "config": None}]

    @app.get("/sdapi/v1/options")
    async def get_options():
        return {"sd_model_checkpoint": model_name, "samples_format": "png",
                "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0}

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        try:
            options = json.loads(await request.body() or b"{}")
        except json.JSONDecodeError as exc:
            raise BadRequest("body", f"not JSON ({exc.msg})") from None
        if not isinstance(options, dict):
            raise BadRequest("body", "expected a JSON object of options")
        wanted = options.get("sd_model_checkpoint")
        if wanted not in (None, model_name):
            raise BadRequest("sd_model_checkpoint", f"{wanted!r} is not served here; valid: "
                             f"{model_name!r} (start the server with --model to serve another)")
        return None

    @app.get("/sdapi/v1/progress")
    async def progress():
        p = batcher.progress
        state = {"job_count": p.queued_images + p.batch_images, "sampling_step": p.step,
                 "sampling_steps": p.steps, "interrupted": False, "job": "", "skipped": False}
        return {"progress": round(p.fraction(), 4), "eta_relative": round(p.eta(), 3),
                "state": state, "current_image": None, "textinfo": None}

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        batcher.interrupt()
        return None

    # ------------------------------------------------------------------ ours

    @app.post("/v1/generate")
    async def generate(request: Request):
        body = await body_of(request, NativeRequest)
        params, seed = _native_params(body, settings, engine, limits)
        results = await _generate(body.prompt, seed, body.num_images, 1, params)
        if results is None:
            return JSONResponse({"detail": "interrupted", "images": []}, 200)
        saved = _keep(results, params, body.save)
        return {"images": saved}

    @app.get("/v1/health")
    async def health():
        return {"status": "ok", "model": model_name, "queued_images": batcher.queued(),
                "device": str(engine.device)}

    @app.get("/v1/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.prometheus(batcher.queued()),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def gallery():
        return _gallery(recent)

    @app.get("/v1/images/{number}")
    async def image(number: int):
        for item in recent:
            if item["number"] == number:
                return Response(base64.b64decode(item["png_base64"]), media_type="image/png")
        return JSONResponse({"detail": f"no recent image {number}"}, 404)

    # ------------------------------------------------------------------ helpers

    async def _generate(prompt: str, seed: int, per_batch: int, batches: int,
                        params: JobParams):
        # Prompts of one batch are padded to its longest (in 75-token chunks), which would
        # change the shorter ones: only prompts of the same chunk count share a batch.
        chunks = engine.prompts.chunk_count(prompt, params.negative_prompt)
        jobs = [Job((*_key(params), chunks), prompt,
                    [seed + b * per_batch + k for k in range(per_batch)], params)
                for b in range(batches)]
        batcher.submit(jobs)
        try:
            parts = await asyncio.gather(*(asyncio.wrap_future(job.future) for job in jobs))
        except Interrupted:
            return None
        except ConfigError as exc:  # e.g. a size the model cannot take
            raise BadRequest(_field_of(str(exc)), str(exc)) from None
        except Exception:
            metrics.errors += 1
            raise
        return [result for part in parts for result in part]

    def _keep(results, params: JobParams, save: bool) -> list[dict[str, Any]]:
        """Each result as PNG bytes with the CLI's metadata; saved like the CLI if asked."""
        from sdaccel.outputs import RunWriter, image_metadata

        job_settings = settings.model_copy(update={"generation": params.generation,
                                                   "sampler": params.sampler})
        kept = []
        writer = RunWriter(job_settings, model_name, model_hash) if save else None
        for result in results:
            info, parameters, png_info = image_metadata(result, job_settings, model_name,
                                                        model_hash)
            buffer = io.BytesIO()
            result.image.save(buffer, format="PNG", pnginfo=png_info)
            item = {**info, "parameters": parameters,
                    "png_base64": base64.b64encode(buffer.getvalue()).decode()}
            if writer is not None:
                item["path"] = writer.save(result)["path"]
            recent.append({**item, "number": next(numbers), "time": time.strftime("%H:%M:%S")})
            del recent[:-48]  # the gallery keeps the newest 48
            kept.append(item)
        return kept

    return app


class NativeRequest(BaseModel):
    """POST /v1/generate: a prompt and our own settings schema for what may differ per request
    (generation, sampler, seed); the rest is fixed when the server starts."""

    model_config = {"extra": "forbid"}

    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    num_images: int = 1
    save: bool = False
    settings: dict[str, Any] = {}


_PER_REQUEST = ("generation", "sampler", "seed")


def _native_params(body: NativeRequest, settings: Settings, engine, limits: Limits):
    from sdaccel.settings import layer_over

    for key in body.settings:
        if key not in _PER_REQUEST:
            raise BadRequest(f"settings.{key}", "fixed when the server starts; per request: "
                             f"{', '.join(_PER_REQUEST)}")
    overrides = [f"{key}={json.dumps(value)}" for key, value in _dotted(body.settings)]
    try:
        chosen = layer_over(settings, overrides=overrides).settings
    except ConfigError as exc:
        raise BadRequest(_field_of(str(exc), prefix="settings."), str(exc)) from None
    g = chosen.generation
    generation = _generation(g.width, g.height, g.guidance_scale, engine, limits)
    _check_counts(body.num_images, 1, chosen.sampler.steps, limits)
    seed = body.seed if body.seed is not None else chosen.seed
    return JobParams(body.negative_prompt, generation, chosen.sampler), seed


def _dotted(values: dict[str, Any], prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _generation(width: int, height: int, guidance: float, engine,
                limits: Limits) -> GenerationSettings:
    if width * height > limits.max_pixels:
        raise BadRequest("width", f"{width}x{height} is beyond the server's --max-pixels "
                         f"{limits.max_pixels}")
    try:
        generation = GenerationSettings(width=width, height=height, guidance_scale=guidance)
        engine.check_size(height, width)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise BadRequest(str(error["loc"][0]) if error["loc"] else "body",
                         error["msg"]) from None
    except ConfigError as exc:
        raise BadRequest(_field_of(str(exc)), str(exc)) from None
    return generation


def _check_counts(batch_size: int, n_iter: int, steps: int, limits: Limits) -> None:
    for field_name, value in (("batch_size", batch_size), ("n_iter", n_iter), ("steps", steps)):
        if value < 1:
            raise BadRequest(field_name, f"{value}: must be at least 1")
    if batch_size * n_iter > limits.max_images:
        raise BadRequest("batch_size", f"{batch_size} x n_iter {n_iter} images: limit "
                         f"{limits.max_images} per request")
    if steps > limits.max_steps:
        raise BadRequest("steps", f"{steps}: limit {limits.max_steps}")


# Settings keys -> the A1111 request fields that set them.
_A1111_FIELDS = {"generation.width": "width", "generation.height": "height",
                 "generation.guidance_scale": "cfg_scale", "sampler.steps": "steps",
                 # before sampler.name, which their messages name too
                 "sampler.schedule": "scheduler", "sampler.eta": "eta",
                 "adaptive.mode": "sampler_name", "sampler.name": "sampler_name"}


def _field_of(message: str, prefix: str = "") -> str:
    """The field a ConfigError names: its message starts with the settings key (or says
    'invalid settings: <layer>: <key>: ...')."""
    for key, a1111 in _A1111_FIELDS.items():
        if key in message:
            return prefix + key if prefix else a1111
    return "body"


def _key(params: JobParams) -> tuple:
    """What jobs must share to ride in one engine call (besides their prompts' chunk count)."""
    g = params.generation
    return (g.width, g.height, g.guidance_scale, *params.sampler.model_dump().values(),
            params.negative_prompt)


def _authorised(request: Request, api_key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return secrets.compare_digest(value.strip(), api_key)
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except ValueError:
            return False
        return secrets.compare_digest(password, api_key)
    return False


def _answer(metrics: Metrics, path: str, response: Response) -> Response:
    if path.startswith(("/sdapi", "/v1/generate")):
        key = (path, response.status_code)
        metrics.requests[key] = metrics.requests.get(key, 0) + 1
    return response


def _gallery(recent: list[dict[str, Any]]) -> str:
    cards = "\n".join(
        f'<figure><img src="/v1/images/{item["number"]}" alt="{html.escape(item["prompt"])}">'
        f'<figcaption><b>{html.escape(item["prompt"])}</b><br>seed {item["seed"]}, '
        f'{item["steps"]} steps, {item["width"]}x{item["height"]}, {item["time"]}'
        f'<pre>{html.escape(item["parameters"])}</pre></figcaption></figure>'
        for item in reversed(recent))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sdaccel: recent images</title>
<style>body{{font-family:sans-serif;margin:1em}} figure{{display:inline-block;width:280px;
vertical-align:top;margin:.5em}} img{{width:256px;image-rendering:pixelated}}
pre{{white-space:pre-wrap;font-size:.75em}}</style></head>
<body><h1>Recent images</h1><p id="count">{len(recent)} image(s)</p>
{cards or '<p>No images yet: POST /sdapi/v1/txt2img or /v1/generate.</p>'}
</body></html>"""
