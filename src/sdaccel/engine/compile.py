"""torch.compile of the UNet and VAE decode, falling back to eager with a visible warning."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from sdaccel.events import EventHandler, Warning
from sdaccel.settings import CompileSettings

log = logging.getLogger(__name__)


def compile_callable(
    fn: Callable[..., Any], options: CompileSettings, what: str, on_event: EventHandler
) -> Callable[..., Any]:
    """`fn` compiled with the seed's options; if compilation fails, eager `fn` from then on."""
    compiled = torch.compile(
        fn, mode=options.mode, fullgraph=options.fullgraph, dynamic=options.dynamic
    )
    return _EagerFallback(compiled, fn, what, on_event)


class _EagerFallback:
    """Calls the compiled function; compilation happens lazily on a call, so that is where a
    failure shows. One failure switches to eager for good and tells the user why."""

    def __init__(self, compiled, eager, what: str, on_event: EventHandler) -> None:
        self._active = compiled
        self._eager = eager
        self._what = what
        self._on_event = on_event
        self.fell_back = False

    def __call__(self, *args, **kwargs):
        if self.fell_back:
            return self._eager(*args, **kwargs)
        try:
            return self._active(*args, **kwargs)
        except Exception as exc:  # any compiler failure: keep generating, eagerly
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            self.fell_back = True
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            message = (f"torch.compile of the {self._what} failed ({type(exc).__name__}: "
                       f"{reason}); running it eagerly")
            log.warning(message)
            self._on_event(Warning(message))
            return self._eager(*args, **kwargs)
