"""The compile cache: compiled artifacts stored per settings and shape, loaded before compiling.

Cache layout: `<cache root>/compile/<key>/{meta.json, artifacts.bin}`. The root is
`$SDACCEL_CACHE_DIR`, else the platform cache directory (`$XDG_CACHE_HOME/sdaccel`,
`~/.cache/sdaccel`, `~/Library/Caches/sdaccel`, `%LOCALAPPDATA%\\sdaccel\\Cache`). An entry holds
`torch.compiler.save_cache_artifacts()` (inductor's FX-graph and AOT-autograd cache entries,
Triton autotuning on GPU) and records torch, triton, diffusers, the device name, the preset, the
shape, and a hash of the settings that change the compiled graph. Loading pre-fills torch's own
caches, so compiling then takes cache hits; an entry made by other versions or another device is
reported and skipped, never loaded, and a damaged entry never stops a run.

This module sits above the engine: the engine compiles (`sdaccel.engine.speed.compile`) and knows
nothing of stored entries. Front ends build their engine with `sdaccel.runs.start_engine`, which
loads the matching entries (`load_matching`) before the engine's first call compiles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdaccel.cache_dir import cache_root
from sdaccel.engine.engine import Engine
from sdaccel.engine.loading.precision import choose_precision, resolve_device
from sdaccel.errors import ConfigError, SdaccelError, writing
from sdaccel.events import EventHandler, Warning, ignore
from sdaccel.settings import Settings

log = logging.getLogger(__name__)

META = "meta.json"
ARTIFACTS = "artifacts.bin"
# Built kernels (inductor's C++ .so files on the CPU) that torch's artifacts do not carry: without
# them a warm start on the CPU would still rebuild every kernel. Triton kernels travel inside the
# artifacts already.
KERNELS = "kernels.tar"
_NOT_KERNELS = {"fxgraph", "aotautograd", "triton", "locks", "pgo", "autotune"}
DEFAULT_PROMPT = "a red circle on a blue background"


# --------------------------------------------------------------------------- cache: identity


def compile_dir(environ: dict[str, str] | None = None) -> Path:
    return cache_root(environ) / "compile"


def _resolved(device: str | None) -> str:
    """`device`, with "auto" (or None) resolved as the engine resolves it."""
    if device is None or device == "auto":
        return resolve_device("auto").type
    return device


def graph_settings(settings: Settings) -> dict[str, Any]:
    """The settings that change what torch.compile builds (not prompts, seeds, steps, paths)."""
    device = _resolved(settings.device)
    precision = {key: choose_precision(key, getattr(settings, key), torch.device(device)).precision
                 for key in ("unet_dtype", "vae_dtype")}  # "auto" as the engine resolves it
    return {
        "model_id": settings.model_id,
        "device": device.split(":")[0],
        **precision,
        "compile": settings.compile.model_dump(exclude={"cache"}),
        "optimize": settings.optimize.model_dump(),
        "guided": settings.generation.guidance_scale > 1.0,
        # the decoder compile.compile_vae compiles (absent for the VAE: older entries match)
        **({"tiny_decoder": settings.tiny_decoder} if settings.tiny_decoder else {}),
    }


def graph_hash(settings: Settings) -> str:
    text = json.dumps(graph_settings(settings), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def environment(device: str | None = None) -> dict[str, str | None]:
    """Versions and the device name an entry is only valid for (`device` as in the settings,
    "auto" included; None: the device "auto" picks)."""
    import diffusers

    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    device = _resolved(device)
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        # Inductor's C++ kernels are built for the thread count: another count recompiles.
        name = (f"cpu {platform.machine()} {torch.backends.cpu.get_cpu_capability()}, "
                f"{torch.get_num_threads()} threads")
    return {"torch": torch.__version__, "triton": triton_version,
            "diffusers": diffusers.__version__, "device_name": name}


# --------------------------------------------------------------------------- cache: entries


@dataclass
class CacheEntry:
    key: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def mismatch(self, current: dict[str, str | None]) -> list[str]:
        """What differs from this machine, as 'torch 2.5.1 (here 2.13.0)'; empty if usable."""
        recorded = self.meta.get("environment", {})
        if not recorded:
            return [f"unreadable entry ({self.meta.get('error', 'no metadata')})"]
        return [f"{k} {recorded.get(k)} (here {v})" for k, v in current.items()
                if recorded.get(k) != v]

    def summary(self) -> dict[str, Any]:
        env = self.meta.get("environment", {})
        return {
            "key": self.key, "preset": self.meta.get("preset"),
            "model_id": self.meta.get("graph_settings", {}).get("model_id"),
            "height": self.meta.get("height"), "width": self.meta.get("width"),
            "batch": self.meta.get("batch"), **env,
            "graph_hash": self.meta.get("graph_hash"),
            "cold_seconds": self.meta.get("cold_seconds"),
            "created": self.meta.get("created"), "size_bytes": self.size_bytes,
            "path": str(self.path),
        }


def entry_key(settings: Settings, batch: int) -> str:
    g = settings.generation
    return f"{graph_hash(settings)}-{g.height}x{g.width}-b{batch}"


def list_entries(environ: dict[str, str] | None = None) -> list[CacheEntry]:
    root = compile_dir(environ)
    if not root.is_dir():
        return []
    entries = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError) as exc:
            meta = {"error": f"{META}: {type(exc).__name__}"}
        entries.append(CacheEntry(path.name, path, meta))
    return entries


def clear(keys: Sequence[str] = (), environ: dict[str, str] | None = None) -> list[str]:
    """Remove the named entries (all when none are named); return the keys removed."""
    entries = {e.key: e for e in list_entries(environ)}
    unknown = [k for k in keys if k not in entries]
    if unknown:
        valid = ", ".join(entries) or "none (the cache is empty)"
        raise ConfigError(f"compile cache: no entry {unknown[0]!r} in {compile_dir(environ)}; "
                          f"entries: {valid}")
    removed = list(keys) or list(entries)
    for key in removed:
        shutil.rmtree(entries[key].path, ignore_errors=True)
    return removed


def save_entry(settings: Settings, preset: str, batch: int, cold_seconds: float,
               environ: dict[str, str] | None = None,
               kernels_from: Path | None = None) -> CacheEntry:
    """Store what torch compiled in this process as the entry for these settings and shape
    (with the built kernels found in the inductor cache folder `kernels_from`, if given)."""
    saved = torch.compiler.save_cache_artifacts()
    if not saved or not saved[0]:
        raise SdaccelError("compile cache: torch recorded no compiled artifacts to store "
                           "(is torch's inductor cache disabled, e.g. TORCHINDUCTOR_FORCE_"
                           "DISABLE_CACHES=1?)")
    data, info = saved
    key = entry_key(settings, batch)
    root = compile_dir(environ)
    meta = {
        "key": key, "preset": preset, "graph_hash": graph_hash(settings),
        "graph_settings": graph_settings(settings),
        "height": settings.generation.height, "width": settings.generation.width,
        "batch": batch, "environment": environment(settings.device),
        "cold_seconds": round(cold_seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "artifacts": {kind: len(items) for kind, items in _info_items(info)},
    }
    final = root / key
    with writing(final):  # a full disk: one line naming the entry, and no half-written entry
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            (staging / ARTIFACTS).write_bytes(data)
            if kernels_from is not None:
                meta["kernel_files"] = _bundle_kernels(kernels_from, staging / KERNELS)
            (staging / META).write_text(json.dumps(meta, indent=2))
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return CacheEntry(key, final, meta)


def _info_items(info) -> Iterator[tuple[str, list]]:
    for name in dir(info):
        if name.endswith("_artifacts") and not name.startswith("_"):
            value = getattr(info, name)
            if isinstance(value, list):
                yield name.removesuffix("_artifacts"), value


_loaded: set[tuple[str, float]] = set()  # (entry path, mtime) already loaded in this process


def load_matching(settings: Settings, on_event: EventHandler = ignore,
                  environ: dict[str, str] | None = None) -> list[CacheEntry]:
    """Load every stored entry for these graph settings (any shape) into torch's caches; nothing
    unless the settings compile with the cache on (compile.enabled and compile.cache). Call it
    before the engine's first call, which compiles.

    An entry from other versions or another device is reported (a Warning event) and skipped;
    an unreadable one likewise. Returns the entries loaded."""
    if not (settings.compile.enabled and settings.compile.cache):
        return []
    wanted = graph_hash(settings)
    current = environment(settings.device)
    loaded = []
    for entry in list_entries(environ):
        if entry.meta.get("graph_hash") != wanted and "error" not in entry.meta:
            continue
        if "error" in entry.meta:
            on_event(Warning(f"compile cache entry {entry.key} is unreadable "
                             f"({entry.meta['error']}); skipped. `sdaccel compile-cache clear "
                             f"{entry.key}` removes it"))
            continue
        differs = entry.mismatch(current)
        if differs:
            on_event(Warning(f"compile cache entry {entry.key} was made with "
                             f"{', '.join(differs)}; skipped. `sdaccel compile-cache warm` "
                             "makes one for this machine"))
            continue
        artifacts = entry.path / ARTIFACTS
        try:
            marker = (str(artifacts), artifacts.stat().st_mtime)
            if marker not in _loaded:
                load_artifacts(artifacts.read_bytes())
                if (entry.path / KERNELS).is_file():
                    _unpack_kernels(entry.path / KERNELS)
                _loaded.add(marker)
        except Exception as exc:  # a damaged entry must never stop a run
            on_event(Warning(f"compile cache entry {entry.key} could not be loaded "
                             f"({type(exc).__name__}: {str(exc)[:200]}); skipped"))
            continue
        log.info("compile cache: loaded %s", entry.key)
        loaded.append(entry)
    return loaded


def load_artifacts(data: bytes) -> None:
    """torch.compiler.load_cache_artifacts, failing loudly: torch itself only logs a traceback
    (through its own handler) and returns None for bytes it cannot read."""
    quiet = logging.getLogger("torch.compiler._cache")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        info = torch.compiler.load_cache_artifacts(data)
    finally:
        quiet.setLevel(level)
    if info is None:
        raise ValueError("torch could not read the stored artifacts")


def _bundle_kernels(folder: Path, archive: Path) -> int:
    count = 0
    with tarfile.open(archive, "w") as tar:
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if (path.is_file() and relative.parts[0] not in _NOT_KERNELS
                    and not path.name.endswith(".lock")):
                tar.add(path, arcname=relative.as_posix())
                count += 1
    return count


def _unpack_kernels(archive: Path) -> None:
    """Into torch's current inductor cache folder; files already there are kept as they are."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    target = Path(cache_dir())
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and not (target / m.name).exists()]
        tar.extractall(target, members=members, filter="data")


# --------------------------------------------------------------------------- cache: warm


@dataclass
class WarmResult:
    entry: CacheEntry
    cold_seconds: float  # engine build + first generate, compiling from nothing


@contextmanager
def private_inductor_cache() -> Iterator[Path]:
    """Point torch's own on-disk compile caches at an empty folder for a while: the compile
    inside is truly cold, and what it records is exactly what this process compiled."""
    saved = {var: os.environ.get(var) for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    with tempfile.TemporaryDirectory(prefix="sdaccel-inductor-") as folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        os.environ["TRITON_CACHE_DIR"] = str(Path(folder) / "triton")
        from torch.compiler._cache import CacheArtifactManager

        CacheArtifactManager.clear()
        try:
            yield Path(folder)
        finally:
            for var, value in saved.items():
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value


def warm(settings: Settings, preset: str, sizes: Sequence[tuple[int, int]], batch: int,
         prompt: str = DEFAULT_PROMPT, on_event: EventHandler = ignore,
         environ: dict[str, str] | None = None) -> list[WarmResult]:
    """Compile `settings` cold for each (height, width) and batch, and store each as an entry."""
    if not settings.compile.enabled:
        raise ConfigError(f"compile-cache warm: preset {preset!r} has compile.enabled=false, so "
                          "nothing is compiled; add --set compile.enabled=true")
    results = []
    for height, width in sizes:
        variant = settings.model_copy(deep=True)
        variant.generation.height, variant.generation.width = height, width
        variant.generation.num_images_per_prompt = batch
        variant.compile.cache = False  # cold means cold: no stored entry, and no graph this
        torch.compiler.reset()  # process compiled earlier (it would be reused, not recorded)
        with private_inductor_cache() as folder:
            started = time.perf_counter()
            engine = Engine(variant, on_event=on_event)
            engine.generate([prompt])
            cold = time.perf_counter() - started
            if "UNet" in engine.compile_fallbacks:
                raise SdaccelError("compile-cache warm: torch.compile failed (see the warning "
                                   "above); nothing stored")
            variant.compile.cache = settings.compile.cache
            entry = save_entry(variant, preset, batch, cold, environ, kernels_from=folder)
        results.append(WarmResult(entry, cold))
        del engine
    return results
