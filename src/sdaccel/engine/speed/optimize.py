"""Speed passes: one small function per optimisation, composed from `Settings.optimize`.

In the manner of stable-fast's compilers: each pass does one thing to the already cast model, and
`apply_passes` runs the ones the settings switch on, in a fixed order. Every pass is measured by
`sdaccel bench` against the plain diffusers baseline, so its cost in fidelity is a number, not a
guess. A pass's trade-off (what it gained where measured, its quality risk) is written once: in
the description of its `OptimizeSettings` key (sdaccel.settings), which the documentation's
settings reference renders. Nothing here touches global state (the attention
kernel choice is a context around each call, the inductor flags travel with the compile call),
except `reuse_freed_memory`, a setting of the process's C allocator, which its name announces.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch

from sdaccel.engine.lora.hooks import on_weights_changed
from sdaccel.engine.speed import chunked_attention
from sdaccel.engine.speed.heap import keep_freed_memory
from sdaccel.engine.speed.prepack import pack_layers
from sdaccel.errors import DeviceError
from sdaccel.events import EventHandler, Warning, ignore
from sdaccel.settings import Settings

log = logging.getLogger(__name__)

# The inductor options of diffusers' "accelerate inference of text-to-image diffusion models"
# guide (torch._inductor.config.<name> = value there; passed per compile call here).
INDUCTOR_FLAGS: dict[str, Any] = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "epilogue_fusion": False,
    "coordinate_descent_check_all_directions": True,
}


def sdpa_attention(module: torch.nn.Module) -> torch.nn.Module:
    """Every attention through `torch.nn.functional.scaled_dot_product_attention` (diffusers'
    AttnProcessor2_0, what a freshly built StableDiffusionPipeline uses), not diffusers'
    explicit baddbmm + softmax processor. Always applied; `optimize.attention` then picks the
    kernel.

    Quality risk: none beyond float reassociation."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if hasattr(module, "set_attn_processor"):  # a tiny decoder (TAESD) has no attention
        module.set_attn_processor(AttnProcessor2_0())
    return module


def channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """NHWC memory layout for the convolutions. Trade-off: `OptimizeSettings.channels_last`."""
    return module.to(memory_format=torch.channels_last)


def fuse_qkv(module: torch.nn.Module) -> torch.nn.Module:
    """One matmul for query, key and value of every self-attention (key and value of every
    cross-attention): diffusers' `fuse_qkv_projections`, with its fused SDPA processor. The
    fused weights are copies, so a LoRA switch that rewrites to_q, to_k or to_v in place calls
    `refresh_fused_projections` (a hook registered with the LoRA code) to rebuild them.

    Trade-off: `OptimizeSettings.fuse_qkv`."""
    if hasattr(module, "fuse_qkv_projections"):  # a tiny decoder (TAESD) has no attention
        module.fuse_qkv_projections()
        on_weights_changed(module, refresh_fused_projections)
    return module


def refresh_fused_projections(module: torch.nn.Module, changed: Collection[str]) -> None:
    """The to_qkv (to_kv) weight `fuse_qkv` made, rebuilt in place from to_q, to_k, to_v where
    some of them (`changed`: module names inside `module`) were rewritten in place."""
    parents = {name.rpartition(".")[0] for name in changed
               if name.rpartition(".")[2] in ("to_q", "to_k", "to_v")}
    for parent in parents:
        attention = module.get_submodule(parent)
        if not getattr(attention, "fused_projections", False):
            continue  # unfused again since (diffusers' unfuse_qkv_projections)
        if getattr(attention, "to_qkv", None) is not None:
            attention.to_qkv.weight.copy_(torch.cat(
                [attention.to_q.weight, attention.to_k.weight, attention.to_v.weight]))
        if getattr(attention, "to_kv", None) is not None:
            attention.to_kv.weight.copy_(torch.cat(
                [attention.to_k.weight, attention.to_v.weight]))


def prepack_weights(module: torch.nn.Module) -> torch.nn.Module:
    """Linear and convolution weights packed once into oneDNN's layout instead of reordered on
    every call (CPU only; see sdaccel.engine.speed.prepack). Trade-off:
    `OptimizeSettings.prepack_weights`."""
    pack_layers(module)
    return module


def vae_tiling(vae: torch.nn.Module) -> torch.nn.Module:
    """Decode in overlapping tiles (diffusers' `enable_tiling`). Trade-off:
    `OptimizeSettings.vae_tiling`."""
    vae.enable_tiling()
    return vae


def attention_backends(name: str) -> list | None:
    """The SDPA kernels `optimize.attention` allows; None lets PyTorch choose ("sdpa")."""
    from torch.nn.attention import SDPBackend

    return {
        "sdpa": None,
        "flash": [SDPBackend.FLASH_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
        "math": [SDPBackend.MATH],
    }[name]


def attention_in_force(name: str) -> str:
    """`optimize.attention` as it runs here: "chunked" is plain SDPA on a CPU with AMX, whose
    fused kernel is faster there (sdaccel.engine.speed.chunked_attention)."""
    return "sdpa" if name == "chunked" and not chunked_attention.pays_off() else name


def with_attention(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """`fn` run with only the named SDPA kernel allowed ("flash", "efficient", "math"), or with
    bf16 CPU attention computed in chunks ("chunked", sdaccel.engine.speed.chunked_attention).
    Trade-off of each: `OptimizeSettings.attention`."""
    name = attention_in_force(name)
    if name == "chunked":
        context = chunked_attention.ChunkedAttention
    else:
        backends = attention_backends(name)
        if backends is None:
            return fn
        from torch.nn.attention import sdpa_kernel

        context = functools.partial(sdpa_kernel, backends)

    def call(*args, **kwargs):
        with context():
            return fn(*args, **kwargs)

    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call


def check_attention(name: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise DeviceError if the forced attention kernel cannot run on this device and dtype."""
    if name == "chunked":
        if device.type != "cpu":
            raise DeviceError(f"optimize.attention: 'chunked' is for the CPU, not {device.type} "
                              "(valid there: sdpa, flash, efficient, math)")
        return  # calls it does not take over go to whatever SDPA kernel PyTorch picks
    backends = attention_backends(name)
    if backends is None:
        return
    from torch.nn.attention import sdpa_kernel

    q = torch.zeros(1, 1, 8, 64, device=device, dtype=dtype)
    try:
        with sdpa_kernel(backends), torch.inference_mode():
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise DeviceError(
            f"optimize.attention: {name!r} has no kernel on {device.type} for "
            f"{str(dtype).removeprefix('torch.')} ({reason}); valid: sdpa (PyTorch picks), "
            "chunked (CPU), flash, efficient, math"
        ) from None


def _why_not_prepack(settings: Settings, device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"on {device.type}: oneDNN packs CPU weights only"
    if settings.compile.enabled:
        return ("with compile.enabled=true: the compiled graph cannot take packed weights "
                "(compile.freezing packs them inside it)")
    return None


def _why_not_tiling(settings: Settings, device: torch.device) -> str | None:
    # diffusers' AutoencoderTiny tiles even a 512 px image (56-latent steps over 64-latent
    # tiles), so tiling would change every image; TAESD's own activations are small (64
    # channels at the image's size: 64 MB per 512x512 image in fp32).
    return ("with tiny_decoder set: the tiny decoder decodes in one piece"
            if settings.tiny_decoder else None)


def _why_not_on_the_cpu(settings: Settings, device: torch.device) -> str | None:
    return f"on {device.type}: it tunes CPU memory" if device.type != "cpu" else None


def _why_not_inductor_flags(settings: Settings, device: torch.device) -> str | None:
    # Applied with the compile call (compile.compile_options).
    return None if settings.compile.enabled else ("without compile.enabled=true: nothing is "
                                                  "compiled")


@dataclass(frozen=True)
class Pass:
    """One `optimize.<key>` switch: `apply` rewrites each of the `targets` modules in place;
    `why_not(settings, device)` names a reason it cannot act here (a warning; the run goes on
    without it); `process_wide()`, for a pass that acts outside the modules, acts and returns
    None, or returns why it could not."""

    apply: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    targets: tuple[str, ...] = ()
    why_not: Callable[[Settings, torch.device], str | None] = lambda settings, device: None
    process_wide: Callable[[], str | None] | None = None


# `optimize.<key>` -> its pass, run in this order (after SDPA attention). Adding a speed pass:
# its function above, one entry here, one OptimizeSettings key whose description states its
# trade-off (a test checks the two agree).
PASSES: dict[str, Pass] = {
    "fuse_qkv": Pass(fuse_qkv, ("unet", "vae")),
    "channels_last": Pass(channels_last, ("unet", "vae")),
    "vae_tiling": Pass(vae_tiling, ("vae",), _why_not_tiling),
    "prepack_weights": Pass(prepack_weights, ("unet", "vae"), _why_not_prepack),
    "reuse_freed_memory": Pass(why_not=_why_not_on_the_cpu, process_wide=keep_freed_memory),
    "inductor_flags": Pass(why_not=_why_not_inductor_flags),
}


def apply_passes(unet: torch.nn.Module, vae: torch.nn.Module, settings: Settings,
                 device: torch.device, on_event: EventHandler = ignore) -> list[str]:
    """Run the module passes `settings.optimize` switches on (in place); return their names.

    Call after casting. SDPA attention is always set first (fuse_qkv then swaps in the fused
    SDPA processors). The attention kernel choice is applied around calls (`with_attention`),
    the inductor flags with the compile call (`sdaccel.engine.speed.compile.compile_options`)."""
    options = settings.optimize
    applied = []
    check_attention(options.attention, device, unet.dtype)
    sdpa_attention(unet)
    sdpa_attention(vae)
    modules = {"unet": unet, "vae": vae}
    for key, speed_pass in PASSES.items():
        if not getattr(options, key):
            continue
        if unusable := speed_pass.why_not(settings, device):
            on_event(Warning(f"optimize.{key} has no effect {unusable}"))
            continue
        if speed_pass.process_wide and (unusable := speed_pass.process_wide()):
            on_event(Warning(f"optimize.{key} has no effect here: {unusable}"))
            continue
        for target in speed_pass.targets:
            speed_pass.apply(modules[target])
        applied.append(key)
    if (attention := attention_in_force(options.attention)) != "sdpa":
        applied.append(f"attention={attention}")
    log.debug("speed passes applied: %s", ", ".join(applied) or "none")
    return applied
