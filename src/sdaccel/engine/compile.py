"""torch.compile of the UNet and VAE decode, with an eager fallback when compiling fails.

The compile cache (stored artifacts loaded before compiling) lives above the engine, in
`sdaccel.compile_cache`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from sdaccel.engine.optimize import INDUCTOR_FLAGS
from sdaccel.events import EventHandler, Warning
from sdaccel.settings import CompileSettings

log = logging.getLogger(__name__)


def compile_options(options: CompileSettings, inductor_flags: bool) -> dict[str, Any]:
    """Keyword arguments for torch.compile: the seed's mode, plus diffusers' inductor flags when
    asked (torch.compile takes `mode` or `options`, not both: the mode becomes its options)."""
    kwargs: dict[str, Any] = {"fullgraph": options.fullgraph, "dynamic": options.dynamic}
    if not inductor_flags:
        return {**kwargs, "mode": options.mode}
    from torch._inductor import list_mode_options

    mode_options = list_mode_options(options.mode, options.dynamic)
    return {**kwargs, "options": {**mode_options, **INDUCTOR_FLAGS}}


def compile_callable(
    fn: Callable[..., Any], options: CompileSettings, what: str, on_event: EventHandler,
    inductor_flags: bool = False,
) -> EagerFallback:
    """`fn` compiled with the seed's options (and diffusers' inductor flags when asked); if
    compiling fails, eager `fn` from then on."""
    compiled = torch.compile(fn, **compile_options(options, inductor_flags))
    cudagraphs = options.mode in ("reduce-overhead", "max-autotune")
    return EagerFallback(compiled, fn, what, on_event, cudagraphs)


class EagerFallback:
    """Calls the compiled function; compilation happens lazily on a call, so that is where a
    failure shows. One failure switches to eager for good and tells the user why (a Warning
    event); `fell_back` says it happened.

    With CUDA graphs (reduce-overhead, max-autotune) every call starts a new graph step: the
    denoising loop never keeps a previous call's raw output, so its memory may be reused."""

    def __init__(self, compiled, eager, what: str, on_event: EventHandler,
                 cudagraphs: bool = False) -> None:
        self._active = compiled
        self._eager = eager
        self.what = what
        self._on_event = on_event
        self._cudagraphs = cudagraphs
        self.fell_back = False

    def __call__(self, *args, **kwargs):
        if self.fell_back:
            return self._eager(*args, **kwargs)
        try:
            if self._cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            return self._active(*args, **kwargs)
        except Exception as exc:  # any compiler failure: keep generating, eagerly
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            self.fell_back = True
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            message = (f"torch.compile of the {self.what} failed ({type(exc).__name__}: "
                       f"{reason}); running it eagerly")
            log.warning(message)
            self._on_event(Warning(message))
            return self._eager(*args, **kwargs)

