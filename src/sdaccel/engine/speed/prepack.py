"""Linear and Conv2d layers whose weights are pre-packed for oneDNN, for the CPU.

PyTorch's eager CPU kernels reorder a layer's weight into oneDNN's blocked layout on every
call (and fp32 linear layers go through a BLAS whose AMD code path is slow). A packed layer
makes that layout once and calls oneDNN with it: measured on SD 1.5's UNet on a Zen 4 EPYC,
per step 1.5x faster in bf16 at 256x256 (1.1x at 512x512) and 2.3x in fp32, the output
unchanged beyond float reassociation (BENCHMARKS.md). Inductor's freezing does the same inside
a compiled graph; this does it eagerly, with no compile.

Layers stay instances of `nn.Linear` / `nn.Conv2d` (their class is swapped for a subclass), so
state dicts, LoRA injection (PEFT wraps them like any linear layer) and FLOP counting see
nothing new. The packed copy is remade whenever the weight changes (a LoRA switch copies into
it in place, `.to()` replaces it). It costs one more copy of the packed weights in memory.
"""

from __future__ import annotations

import torch
from torch import nn


def packable_dtypes() -> set[torch.dtype]:
    """The weight dtypes oneDNN computes natively on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return set()
    dtypes = {torch.float32}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.add(torch.bfloat16)
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        dtypes.add(torch.float16)
    return dtypes


class Packed:
    """The packed weight of one layer, kept beside the layer's own weight (the base of the
    packed layer classes: `isinstance(layer, Packed)` tells a packed layer)."""

    _PACKED = ("_packed", "_packed_key")

    @property
    def packed(self) -> torch.Tensor | None:
        """The oneDNN weight the last call used; None before a first call (and in a copy)."""
        return self.__dict__.get("_packed")

    def _fits(self, x: torch.Tensor) -> bool:
        """The packed kernels take plain CPU tensors without autograd: anything else (fake
        tensors counting FLOPs, training) takes the layer's own forward."""
        weight = self.weight
        return (type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype == weight.dtype
                and not (torch.is_grad_enabled() and weight.requires_grad))

    def _packed_weight(self, pack) -> torch.Tensor:
        weight = self.weight
        # An inference tensor has no version counter; it cannot be changed in place outside
        # inference mode either, so its storage is what identifies it.
        version = None if weight.is_inference() else weight._version
        key = (weight.data_ptr(), version, weight.dtype)
        if getattr(self, "_packed_key", None) != key:
            self._packed = pack()
            self._packed_key = key
        return self._packed

    def __getstate__(self) -> dict:
        # A oneDNN tensor cannot be copied or pickled; a copy packs again on its first call.
        return {k: v for k, v in self.__dict__.items() if k not in self._PACKED}


class PackedLinear(Packed, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fits(x):
            return super().forward(x)
        rows = x.numel() // x.shape[-1]  # a hint for the layout; any row count runs with it
        packed = self._packed_weight(
            lambda: torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), rows))
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")


class PackedConv2d(Packed, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fits(x):
            return super().forward(x)
        geometry = (list(self.padding), list(self.stride), list(self.dilation), self.groups)
        # The layout is chosen for this input's shape; measured, it serves other batch sizes
        # and resolutions as fast as their own packing would.
        packed = self._packed_weight(lambda: torch._C._nn.mkldnn_reorder_conv2d_weight(
            self.weight.detach().to_mkldnn(), *geometry, list(x.shape)))
        return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, *geometry,
                                                       "none", [], "")


def pack_layers(module: nn.Module) -> int:
    """Swap every plain CPU Linear and zero-padded Conv2d of `module` whose dtype oneDNN runs
    natively for its packed subclass, in place; returns how many were swapped. Subclasses
    (int8 layers, LoRA wrappers) are left alone."""
    dtypes = packable_dtypes()
    swapped = 0
    for layer in module.modules():
        weight = getattr(layer, "weight", None)
        if weight is None or weight.device.type != "cpu" or weight.dtype not in dtypes:
            continue
        if type(layer) is nn.Linear:
            layer.__class__ = PackedLinear
        elif (type(layer) is nn.Conv2d and layer.padding_mode == "zeros"
              and isinstance(layer.padding, tuple)):
            layer.__class__ = PackedConv2d
        else:
            continue
        swapped += 1
    return swapped


def unpack_layers(module: nn.Module) -> None:
    """Undo `pack_layers` in place: plain `nn.Linear` / `nn.Conv2d` again (for a tracer such as
    torch.compile or OpenVINO's converter, or an eager baseline)."""
    for layer in module.modules():
        if isinstance(layer, Packed):
            layer.__class__ = nn.Linear if isinstance(layer, nn.Linear) else nn.Conv2d
            for name in Packed._PACKED:
                layer.__dict__.pop(name, None)
