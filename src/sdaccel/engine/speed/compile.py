"""torch.compile of the UNet and VAE decode, with an eager fallback when compiling fails.

Only a compile may fall back: the first call (where torch compiles, lazily) or a later call that
makes dynamo or inductor compile again (a new shape) and fails there. Once a compiled call has
run, an error in a later call is a runtime error of the model and propagates. The compile cache
(stored artifacts loaded before compiling) lives above the engine, in `sdaccel.compile_cache`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from sdaccel.engine.speed.optimize import INDUCTOR_FLAGS
from sdaccel.events import EventHandler, Warning
from sdaccel.settings import CompileSettings

log = logging.getLogger(__name__)


def compile_options(options: CompileSettings, inductor_flags: bool) -> dict[str, Any]:
    """Keyword arguments for torch.compile: the seed's mode, plus diffusers' inductor flags and
    freezing when asked (torch.compile takes `mode` or `options`, not both: the mode becomes its
    options)."""
    kwargs: dict[str, Any] = {"fullgraph": options.fullgraph, "dynamic": options.dynamic}
    extra = {**(INDUCTOR_FLAGS if inductor_flags else {}),
             **({"freezing": True} if options.freezing else {})}
    if not extra:
        return {**kwargs, "mode": options.mode}
    from torch._inductor import list_mode_options

    mode_options = list_mode_options(options.mode, options.dynamic)
    return {**kwargs, "options": {**mode_options, **extra}}


def compile_callable(
    fn: Callable[..., Any], options: CompileSettings, what: str, on_event: EventHandler,
    inductor_flags: bool = False,
) -> EagerFallback:
    """`fn` compiled with the seed's options (and diffusers' inductor flags when asked); if
    compiling fails, eager `fn` from then on."""
    compiled = torch.compile(fn, **compile_options(options, inductor_flags))
    cudagraphs = options.mode in ("reduce-overhead", "max-autotune")
    return EagerFallback(compiled, fn, what, on_event, cudagraphs)


def _compile_error(exc: Exception) -> bool:
    """An error of compiling: dynamo's (BackendCompilerFailed, Unsupported, ...), inductor's own
    (a C++ or CUDA kernel that does not build, a missing compiler, an op it cannot lower) or
    Triton's; not an error of running what was compiled."""
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor import exc as inductor

    kinds: tuple[type, ...] = (TorchDynamoException, inductor.CppCompileError,
                               inductor.CppWrapperCodegenError, inductor.InvalidCxxCompiler,
                               inductor.OperatorIssue, inductor.SubgraphLoweringException)
    try:
        from triton.compiler.errors import CompilationError
    except ImportError:  # no Triton (CPU builds)
        pass
    else:
        kinds += (CompilationError,)
    return isinstance(exc, kinds)


class EagerFallback:
    """Calls the compiled function; compilation happens lazily on a call, so that is where a
    failure shows. A failed compile switches to eager for good and tells the user why (a Warning
    event); `fell_back` says it happened.

    What counts as a failed compile: an error of dynamo, inductor or Triton (`_compile_error`),
    on the first call, which compiles, or a later one, which compiles again for a new shape. Any
    other error propagates (out of memory, a fault of the compiled code as it runs): falling back
    would hide it and leave the rest of the process eager.

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
            out = self._active(*args, **kwargs)
        except Exception as exc:
            if not _compile_error(exc):
                raise
            self._fall_back(exc)
            return self._eager(*args, **kwargs)
        return out

    def _fall_back(self, exc: Exception) -> None:
        self.fell_back = True
        message = (f"torch.compile of the {self.what} failed ({_describe(exc)}); running it "
                   "eagerly")
        log.warning(message)
        self._on_event(Warning(message))


def _describe(exc: Exception) -> str:
    """'Type: first line', with the backend's own error for dynamo's BackendCompilerFailed
    (whose first line only says "backend='inductor' raised:")."""
    text = str(exc).strip()
    described = f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
    inner = getattr(exc, "inner_exception", None)
    return f"{described} {_describe(inner)}" if isinstance(inner, Exception) else described
