"""UNet feature caching (DeepCache-style): the UNet's forward pass, layer by layer, so that a call
can recompute only its shallow branch and take the deep features from an earlier call.

A UNet2DConditionModel is a ladder of skip connections. Counted from the outside in, skip 0 is
the output of `conv_in`, skip 1 the output of the first layer (resnet + attention) of the first
down block, and so on down to the deepest; the up path consumes them in reverse, so the last up
layer consumes skip 0. The *shallow branch at level L* is `conv_in`, the first L down layers
(which produce skips 0..L) and the last L + 1 up layers (which consume them), with `conv_out`.
Everything between (the deeper down layers, the mid block, the first up layers) is replaced by
the hidden state that entered up layer `n - 1 - L` in the last full call: the features that move
least from one step to the next (DeepCache, Ma et al., CVPR 2024).

Written against diffusers' public module structure (`down_blocks[i].resnets / attentions /
downsamplers`, `up_blocks[i].resnets / attentions / upsamplers`, `mid_block`), so it covers any
UNet2DConditionModel built from the standard blocks: SD 1.x/2.x, the bundled model, user folders.
A full call here is the same sequence of operations as `UNet2DConditionModel.forward` and gives
the same output (tested); UNets with extras this file does not reproduce (class
embeddings, added embeddings other than SDXL's, FreeU) are refused with a clear message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdaccel.errors import ConfigError

Layer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class _UpLayer:
    resnet: torch.nn.Module
    attention: torch.nn.Module | None
    upsamplers: list[torch.nn.Module]  # the block's upsamplers, on its last layer only


class LayeredUNet:
    """`unet`'s forward pass split into layers: full calls that keep the deep features, and
    shallow calls that reuse them."""

    def __init__(self, unet: torch.nn.Module) -> None:
        _check_supported(unet)
        self.unet = unet
        self.down: list[Layer] = []
        for block in unet.down_blocks:
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            for resnet, attention in zip(block.resnets, attentions, strict=True):
                self.down.append(_down_layer(resnet, attention))
            for downsampler in block.downsamplers or []:
                self.down.append(_plain(downsampler))
        self.up: list[_UpLayer] = []
        for block in unet.up_blocks:
            attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
            pairs = list(zip(block.resnets, attentions, strict=True))
            for index, (resnet, attention) in enumerate(pairs):
                last = index == len(pairs) - 1
                self.up.append(_UpLayer(resnet, attention,
                                        list(block.upsamplers or []) if last else []))
        # Skip k is consumed by up layer n - 1 - k: the ladder must close.
        assert len(self.up) == len(self.down) + 1, "unexpected UNet layout"

    @property
    def levels(self) -> int:
        """Valid shallow levels are 0 .. levels - 1 (the deepest keeps only the mid block)."""
        return len(self.down)

    def check_level(self, level: int) -> None:
        if not 0 <= level < self.levels:
            raise ConfigError(f"adaptive.cache.level: {level} is not valid for this UNet, which "
                              f"has skip levels 0-{self.levels - 1}")

    # ------------------------------------------------------------------ calls

    def full(self, sample: torch.Tensor, timestep, context: torch.Tensor,
             level: int, added: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's output, and the deep features a shallow call at `level` will need.
        `added`: the UNet's added conditioning (SDXL's pooled text and sizes)."""
        emb, h = self._embed(sample, timestep, context, added)
        sized = self._needs_sizes(sample)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb, context)
            skips.append(h)
        h = self._mid(h, emb, context)
        cut = len(self.up) - 1 - level
        deep = h
        for index, layer in enumerate(self.up):
            if index == cut:
                deep = h
            h = self._up(layer, h, skips, emb, context, sized)
        return self._out(h), deep

    def shallow(self, sample: torch.Tensor, timestep, context: torch.Tensor, level: int,
                deep: torch.Tensor, added: dict | None = None) -> torch.Tensor:
        """The UNet's output with the deep features of an earlier full call (same rows)."""
        emb, h = self._embed(sample, timestep, context, added)
        sized = self._needs_sizes(sample)
        skips = [h]
        for layer in self.down[:level]:
            h = layer(h, emb, context)
            skips.append(h)
        h = deep
        for layer in self.up[len(self.up) - 1 - level:]:
            h = self._up(layer, h, skips, emb, context, sized)
        return self._out(h)

    # ------------------------------------------------------------------ pieces of forward()

    def _needs_sizes(self, sample) -> bool:
        # As diffusers: upsamplers are told their output size only when a side of the input is
        # not a multiple of the total downsampling (otherwise they double).
        factor = 2**self.unet.num_upsamplers
        return any(side % factor for side in sample.shape[-2:])

    def _embed(self, sample, timestep, context, added) -> tuple[torch.Tensor, torch.Tensor]:
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        if unet.config.addition_embed_type is not None:  # SDXL: pooled text and sizes
            emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=context,
                                           added_cond_kwargs=added)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        return emb, unet.conv_in(sample)

    def _mid(self, h, emb, context) -> torch.Tensor:
        mid = self.unet.mid_block
        if mid is None:
            return h
        if getattr(mid, "has_cross_attention", False):
            return mid(h, emb, encoder_hidden_states=context)
        return mid(h, emb)

    @staticmethod
    def _up(layer: _UpLayer, h, skips: list[torch.Tensor], emb, context,
            sized: bool) -> torch.Tensor:
        skip = skips.pop()
        h = layer.resnet(torch.cat([h, skip], dim=1), emb)
        if layer.attention is not None:
            h = layer.attention(h, encoder_hidden_states=context, return_dict=False)[0]
        for upsampler in layer.upsamplers:
            h = upsampler(h, skips[-1].shape[2:] if sized and skips else None)
        return h

    def _out(self, h) -> torch.Tensor:
        unet = self.unet
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h)


def _down_layer(resnet, attention) -> Layer:
    def layer(h, emb, context):
        h = resnet(h, emb)
        if attention is not None:
            h = attention(h, encoder_hidden_states=context, return_dict=False)[0]
        return h

    return layer


def _plain(module) -> Layer:
    return lambda h, _emb, _context: module(h)


def _check_supported(unet) -> None:
    config = unet.config
    extras = {
        "class_embed_type": config.get("class_embed_type"),
        # SDXL's "text_time" is reproduced (_embed); other added embeddings are not
        "addition_embed_type": (None if config.get("addition_embed_type") == "text_time"
                                else config.get("addition_embed_type")),
        "num_class_embeds": config.get("num_class_embeds"),
        "encoder_hid_dim_type": config.get("encoder_hid_dim_type"),
        "time_cond_proj_dim": config.get("time_cond_proj_dim"),
    }
    used = {key: value for key, value in extras.items() if value is not None}
    freeu = any(getattr(block, "s1", None) for block in unet.up_blocks)
    if used or freeu:
        what = ", ".join(f"{k}={v!r}" for k, v in used.items()) or "FreeU"
        raise ConfigError(f"adaptive.cache: this UNet uses {what}, which feature caching does "
                          "not reproduce; turn adaptive.cache off for this model")
