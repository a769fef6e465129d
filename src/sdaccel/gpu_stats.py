"""Memory and device readings, for CUDA and the CPU.

- CUDA: `torch.cuda` memory statistics (peak allocated since the last reset) and, where the
  `nvidia-ml-py` package is installed, NVML's view of the device (memory used by every process,
  utilisation, power).
- CPU: the process' resident set size; its peak (VmHWM) is reset through
  `/proc/self/clear_refs` on Linux, so that each measured configuration gets its own peak.
  Where that is not possible the peak is the process' lifetime peak (`ru_maxrss`), and
  `Reading.resettable` says so.

Nothing here runs at import time; torch is imported by the functions that need it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class Reading:
    kind: str  # "cuda allocated" | "cpu rss"
    peak_bytes: int
    resettable: bool  # False: a lifetime peak that earlier work may have set


def device_name(device: str) -> str:
    """'NVIDIA H100 80GB HBM3', or 'cpu (N threads)'."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"cpu {platform.machine()} ({torch.get_num_threads()} threads)"


def reset_peak(device: str) -> bool:
    """Start a new peak-memory window; False where the CPU peak cannot be reset."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(torch.device(device))
        torch.cuda.reset_peak_memory_stats(torch.device(device))
        return True
    try:
        _CLEAR_REFS.write_text("5")  # Linux >= 4.0: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def peak(device: str) -> Reading:
    """Peak memory since the last `reset_peak`: CUDA allocated bytes, or the process' RSS."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        dev = torch.device(device)
        torch.cuda.synchronize(dev)
        return Reading("cuda allocated", torch.cuda.max_memory_allocated(dev), True)
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return Reading("cpu rss", hwm * 1024, _CLEAR_REFS.exists())
    return Reading("cpu rss", _ru_maxrss_bytes(), False)


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def synchronize(device: str) -> None:
    """Wait for queued GPU work (timings must not stop at a kernel launch); no-op on the CPU."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(torch.device(device))


def nvml(device: str) -> dict[str, float] | None:
    """NVML readings for the device (needs nvidia-ml-py): memory used by all processes (bytes),
    GPU utilisation (%), power (W). None without NVML or off CUDA."""
    if not device.startswith("cuda"):
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        import torch

        pynvml.nvmlInit()
        index = torch.device(device).index or 0
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        utilisation = pynvml.nvmlDeviceGetUtilizationRates(handle)
        power = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
        return {"memory_used_bytes": float(memory.used), "gpu_util_percent": float(utilisation.gpu),
                "power_w": power}
    except Exception:  # NVML absent or refusing (containers, MIG): readings are optional
        return None


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _ru_maxrss_bytes() -> int:
    import resource

    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024  # macOS bytes, Linux KiB


__all__ = ["Reading", "current_rss_bytes", "device_name", "nvml", "peak", "reset_peak",
           "synchronize"]
