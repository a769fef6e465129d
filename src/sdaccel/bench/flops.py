"""Measured UNet work of one pipeline call: `torch.utils.flop_counter.FlopCounterMode` over the
call, restricted to the UNet module's own count (text encoder and VAE excluded).

The counter sees every aten operation that actually ran, so work a method skips (DeepCache's
cached deep branch) or shrinks (ToMe's merged tokens) is not counted. Attention is counted with
torch's SDPA formula; PyTorch does not register one for the CPU flash kernel
(`_scaled_dot_product_flash_attention_for_cpu`), so it is added here: without it a CPU count
would leave out QK^T and AV, which is most of what token merging saves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *_args, out_shape=None, **_kwargs):
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def unet_flops(unet, run: Callable[[], Any]) -> int:
    """FLOPs the module `unet` executed while `run()` ran (forward only). Raises LookupError if
    the counter saw no call of it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _sdpa_cpu_flop
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        run()
    counts = counter.get_flop_counts()
    # The tracker names a module called at top level by its class name.
    name = type(unet).__name__
    if name not in counts:
        raise LookupError(f"the FLOP counter saw no call of {name}")
    return int(sum(counts[name].values()))
