"""Precision per component: fp32/fp16/bf16 casts, int8 text encoder through bitsandbytes.

Also the run-time checks that settings validation cannot do without torch: is the device there,
and can it run the requested precisions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sdaccel.errors import DeviceError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_dtypes(settings) -> dict[str, torch.dtype]:
    """The dtype each model part is read from its files in: its settings precision (resolved,
    not "auto"); int8 parts are read in fp32, which bitsandbytes quantizes from."""
    precisions = {"unet": settings.unet_dtype, "vae": settings.vae_dtype,
                  "text_encoder": settings.text_encoder_dtype}
    return {part: DTYPES.get(p, torch.float32) for part, p in precisions.items()}


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when present, else cpu; 'cuda' without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r} requested but CUDA is not available on this machine "
                f"(torch {torch.__version__}); use --set device=cpu (or device: auto)"
            )
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    return torch.device(device)


PRECISION_KEYS = ("unet_dtype", "vae_dtype", "text_encoder_dtype")


def device_for(settings) -> torch.device:
    """The device `settings` ask for, checked to exist and to run each component's precision."""
    device = resolve_device(settings.device)
    check_precisions(device, {key: getattr(settings, key) for key in PRECISION_KEYS})
    return device


@dataclass(frozen=True)
class Choice:
    """A component's precision: what was asked, what runs, and why (shown by inspect-config)."""

    asked: str
    precision: str
    reason: str
    slow: bool = False  # bf16 asked for on a CPU that only emulates it


def cpu_bf16_support() -> str | None:
    """The CPU feature that computes bf16 in hardware (AMX, AVX512-BF16, Arm BF16), or None.

    Without one, PyTorch emulates bf16 through fp32 conversions: measured 16x *slower* than fp32
    for an SD 1.5 UNet call on an AVX2-only EPYC, against 2.4x faster on a Xeon with AMX."""
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return "Arm BF16" if "bf16" in arm_features() else None


def arm_features() -> set[str]:
    """The CPU flags /proc/cpuinfo lists as Arm `Features` (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("Features")
            for flag in line.split(":", 1)[1].split()}


def choose_precision(key: str, asked: str, device: torch.device) -> Choice:
    """`asked` as it is, or for "auto" the fastest precision `device` runs natively:

    - CUDA: bf16 where the GPU has it, else fp16 (half the memory and tensor cores either way).
    - CPU with native bf16: bf16 for the UNet and VAE, whose calls are the image's time; fp32
      for the text encoder, one call per image, where bf16 would save nothing worth its error.
    - any other CPU: fp32, because emulated bf16 is slower than fp32."""
    if asked == "bf16" and device.type == "cpu" and cpu_bf16_support() is None:
        return Choice(asked, asked, "as set, but this CPU has no native bf16 (no AMX, "
                                    "AVX512-BF16 or Arm BF16): emulated, slower than fp32; "
                                    "auto picks fp32 here", slow=True)
    if asked != "auto":
        return Choice(asked, asked, "as set")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Choice(asked, "bf16", f"{torch.cuda.get_device_name(device)} has bf16")
        return Choice(asked, "fp16", f"{torch.cuda.get_device_name(device)} has no bf16")
    if device.type != "cpu":
        return Choice(asked, "fp32", f"{device.type}: fp32, the one precision known to run")
    feature = cpu_bf16_support()
    if feature is None:
        return Choice(asked, "fp32", "this CPU has no native bf16 (no AMX, AVX512-BF16 or Arm "
                                     "BF16): emulated bf16 is slower than fp32")
    if key == "text_encoder_dtype":
        return Choice(asked, "fp32", f"CPU has {feature}, but the text encoder runs once per "
                                     "image: fp32 costs little there")
    return Choice(asked, "bf16", f"this CPU has {feature}: native bf16")


def choose_precisions(settings, device: torch.device) -> dict[str, Choice]:
    return {key: choose_precision(key, getattr(settings, key), device) for key in PRECISION_KEYS}


def check_precisions(device: torch.device, dtypes: dict[str, str]) -> None:
    """Raise DeviceError naming the component whose precision this device cannot run."""
    for key, name in dtypes.items():
        if device.type == "cuda" and name == "bf16" and not torch.cuda.is_bf16_supported():
            raise DeviceError(
                f"{key}: bf16 is not supported by {torch.cuda.get_device_name(device)}; "
                "use fp16 or fp32"
            )
        if name == "int8":
            _import_bitsandbytes()


def _import_bitsandbytes():
    # Its CPU backend looks for an optional 4-bit kernel at import (through the `kernels`
    # package, which warns when the Hub is offline) and warns when there is none: we never use it.
    quiet = [logging.getLogger(name) for name in ("bitsandbytes.backends.cpu.ops", "kernels")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as exc:
        raise DeviceError(
            f"text_encoder_dtype int8 needs bitsandbytes, which failed to import: {exc}"
        ) from None
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    return bitsandbytes


def cast(module: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    """fp32/fp16/bf16: a plain cast. int8: Linear layers to bitsandbytes LLM.int8()."""
    if precision == "int8":
        return quantize_int8(module, device)
    module = module.to(device)
    dtype = DTYPES[precision]
    # Only cast when needed: diffusers warns on every dtype .to(), even a no-op one.
    return module if module.dtype == dtype else module.to(dtype=dtype)


def quantize_int8(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Replace every nn.Linear with bitsandbytes' Linear8bitLt (int8 weights, outlier threshold
    6.0 as in LLM.int8()); embeddings and norms keep their precision (fp16 on CUDA, fp32 on CPU).
    """
    bnb = _import_bitsandbytes()
    rest_dtype = torch.float16 if device.type == "cuda" else torch.float32
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, _int8_linear(bnb, child, rest_dtype))
    return _move_int8(module, device, rest_dtype)


def _int8_linear(bnb, linear: torch.nn.Linear, bias_dtype: torch.dtype):
    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features,
                            bias=linear.bias is not None, has_fp16_weights=False, threshold=6.0)
    q.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False,
                                 has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = torch.nn.Parameter(linear.bias.data.to(bias_dtype), requires_grad=False)
    return q


def _move_int8(module: torch.nn.Module, device: torch.device, rest_dtype: torch.dtype):
    """Cast everything but the int8 weights, then move: Int8Params quantise on that move."""
    for sub in module.modules():
        for param in sub.parameters(recurse=False):
            if not hasattr(param, "SCB"):  # not an Int8Params
                param.data = param.data.to(rest_dtype)
    return module.to(device)
