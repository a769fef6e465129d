"""`sdaccel serve`: one warm engine behind AUTOMATIC1111's HTTP API and our own."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from sdaccel.cli.command import command

if TYPE_CHECKING:
    from sdaccel.settings import ResolvedSettings

Host = Annotated[str, typer.Option("--host", help="Address to bind; 0.0.0.0 serves every "
                                   "network the machine is on.")]
Port = Annotated[int, typer.Option("--port", help="Port (7860 is AUTOMATIC1111's).")]
ApiKey = Annotated[str | None, typer.Option(
    "--api-key", envvar="SDACCEL_API_KEY", help="Require this key (Authorization: Bearer KEY, or "
    "HTTP basic auth with it as the password) on every endpoint but /v1/health and "
    "/v1/metrics; the gallery asks for it once and keeps it in a cookie.", show_default=False)]
ModelsDirOption = Annotated[Path | None, typer.Option(
    "--models-dir", help="A models folder laid out as AUTOMATIC1111's: checkpoints/ (or "
    "Stable-diffusion/), loras/ (or Lora/), embeddings/. Clients list and switch its "
    "checkpoints, <lora:name:weight> in prompts loads its LoRAs, its embeddings are loaded.",
    show_default=False)]
MaxBodyMb = Annotated[int, typer.Option("--max-body-mb", min=1, help="Request body limit in "
                                        "MiB (init images come base64 in the body); beyond: "
                                        "413.")]
MaxBatch = Annotated[int, typer.Option("--max-batch", min=1, help="Images per engine call "
                                       "when concurrent requests merge.")]
MaxWait = Annotated[int, typer.Option("--max-wait-ms", min=0, help="How long a batch waits for "
                                      "compatible requests to join it.")]
MaxQueue = Annotated[int, typer.Option("--max-queue", min=1, help="Images waiting at most; "
                                       "beyond, requests get 503 with Retry-After.")]
MaxPixels = Annotated[int, typer.Option("--max-pixels", min=64, help="Width x height limit of "
                                        "one image.")]


@command(exclude=("num_images",), engine=True)  # each request says its batch
def serve(
    console: Console,
    settings: ResolvedSettings,
    host: Host = "127.0.0.1",
    port: Port = 7860,
    api_key: ApiKey = None,
    max_batch: MaxBatch = 4,  # the defaults are serve.app.Limits' (not imported here: FastAPI)
    max_wait_ms: MaxWait = 100,
    max_queue: MaxQueue = 64,
    max_pixels: MaxPixels = 1024 * 1024,
    max_body_mb: MaxBodyMb = 50,
    models_dir: ModelsDirOption = None,
) -> None:
    """Serve the settings' model over HTTP: AUTOMATIC1111's /sdapi/v1 API (txt2img, img2img,
    options, progress, the lists its clients read), /v1/generate, /v1/health, /v1/metrics,
    and a gallery of recent images at /.

    The model loads (and compiles, from the compile cache when it has an entry) once; concurrent
    compatible requests are merged into one engine call, every image keeping its own seed.
    """
    import uvicorn

    from sdaccel.serve.app import Limits, create_app
    from sdaccel.serve.models_dir import ModelsDir

    def notice(message: str) -> None:
        console.print(f"[yellow]Warning:[/] {escape(message)}", highlight=False)

    if host not in ("127.0.0.1", "localhost", "::1"):
        notice(f"--host {host}: the API is reachable from other machines"
               + ("" if api_key else " and anyone there can use it (set --api-key)"))
    limits = Limits(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                    max_pixels=max_pixels, max_body_bytes=max_body_mb << 20)
    models = ModelsDir(models_dir) if models_dir is not None else None  # ConfigError: 1 line
    console.print(f"[dim]loading {escape(settings.settings.model_id)} "
                  f"(preset {escape(str(settings.preset))})[/]",
                  highlight=False)
    app = create_app(settings.settings, limits, api_key, on_notice=notice, models_dir=models)
    # The model loads here, not in uvicorn's start-up, so that a model that cannot load is one
    # line and our exit code, and "serving on" comes once it can serve.
    app.state.server.start()
    console.print(f"serving on http://{host}:{port}  (A1111 API at /sdapi/v1, gallery at /)",
                  highlight=False)
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("SDACCEL_LOG", "warning"))
