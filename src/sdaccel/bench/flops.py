"""Measured UNet work of one pipeline call: `torch.utils.flop_counter.FlopCounterMode` over the
call, restricted to the UNet module's own count (text encoder and VAE excluded).

The counter sees every aten operation that actually ran, so work a method skips (DeepCache's
cached deep branch) or shrinks (ToMe's merged tokens) is not counted. It is the engine's own
counter (`engine.sampling.cost.flop_counter`), which also counts the CPU's fused attention kernel:
without it a CPU count would leave out QK^T and AV, most of what token merging saves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def unet_flops(unet, run: Callable[[], Any]) -> int:
    """FLOPs the module `unet` executed while `run()` ran (forward only). Raises LookupError if
    the counter saw no call of it."""
    from sdaccel.engine.sampling.cost import flop_counter

    counter = flop_counter()
    with counter:
        run()
    counts = counter.get_flop_counts()
    # The tracker names a module called at top level by its class name.
    name = type(unet).__name__
    if name not in counts:
        raise LookupError(f"the FLOP counter saw no call of {name}")
    return int(sum(counts[name].values()))
