"""What a UNet call costs, in FLOPs counted by PyTorch, so that methods which skip part of a call
are charged for what actually ran.

Counts come from `torch.utils.flop_counter.FlopCounterMode` (matrix multiplications,
convolutions, attention, the CPU's fused attention kernel included) over one call on fake
tensors: shapes only, no arithmetic, about a second even for SD 1.5 at 512x512. FLOPs grow
linearly with the batch, so one row is counted and calls are charged per row. The unit of cost
is one full call for one image of the plain loop: both halves with guidance, the conditional one
alone without.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode


def _cpu_attention_flops(query_shape, key_shape, value_shape, *_args, **_kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """PyTorch's FLOP counter, taught the CPU's fused attention kernel: it has no formula for
    `_scaled_dot_product_flash_attention_for_cpu`, and would leave out QK^T and AV there."""
    mapping = {}
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_attention is not None:
        mapping[cpu_attention] = _cpu_attention_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(call: Callable[..., object], *shapes: tuple[int, ...],
                dtype: torch.dtype = torch.float32) -> int:
    """FLOPs of `call(*tensors)`, the tensors being fake ones of the given shapes."""
    with FakeTensorMode(allow_non_fake_inputs=True), torch.inference_mode():
        tensors = [torch.zeros(shape, dtype=dtype) for shape in shapes]
        with flop_counter() as counter:
            call(*tensors)
    return counter.get_total_flops()


class UNetCost:
    """FLOPs of one row's full UNet call and of its shallow branches, for one latent size."""

    def __init__(self, unet: torch.nn.Module, layered, latent_shape: tuple[int, ...],
                 context_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.unet, self.layered = unet, layered
        self.shapes = [(1, *latent_shape), (1, *context_shape), *added_shapes(unet)]
        self.dtype = dtype
        self.full = count_flops(
            lambda x, c, *added: unet(x, 500, encoder_hidden_states=c, return_dict=False,
                                      **added_kwargs(added)),
            *self.shapes, dtype=dtype)

    @cache  # noqa: B019 - one object per engine and size, a handful of levels
    def shallow(self, level: int) -> int:
        layered = self.layered

        def call(x, c, *added):
            conditions = added_kwargs(added).get("added_cond_kwargs")
            _, deep = layered.full(x, 500, c, level, conditions)
            layered.shallow(x, 500, c, level, deep, conditions)

        both = count_flops(call, *self.shapes, dtype=self.dtype)
        return both - self.full

    def fraction(self, level: int) -> float:
        """A shallow call at `level` as a fraction of a full one."""
        return self.shallow(level) / self.full


def added_shapes(unet) -> list[tuple[int, ...]]:
    """The shapes of SDXL's added UNet inputs for one row, in `added_kwargs`' order: the pooled
    text and the six size numbers; none for a UNet without them."""
    config = unet.config
    if config.get("addition_embed_type") != "text_time":
        return []
    sizes = 6 * config.addition_time_embed_dim
    return [(1, config.projection_class_embeddings_input_dim - sizes), (1, 6)]


def added_kwargs(tensors: tuple) -> dict:
    """The UNet's keyword arguments for the added inputs `tensors` (text_embeds, time_ids);
    nothing for none."""
    if not tensors:
        return {}
    text_embeds, time_ids = tensors
    return {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}
