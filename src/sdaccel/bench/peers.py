"""Peers: what a user would reach for instead of sdaccel, applied to the plain diffusers baseline
pipeline and measured in the same run.

- `deepcache`: the DeepCache package's `DeepCacheSDHelper` (UNet feature caching, Ma et al.,
  CVPR 2024). Parameters are the helper's own: `cache_interval` (default 3: a full UNet call
  every third step) and `cache_branch_id` (default 0: only the shallowest branch recomputed).
- `tomesd`: token merging (`tomesd.apply_patch`, Bolya & Hoffman 2023). Parameters are
  apply_patch's own: `ratio` (default 0.5), `max_downsample`, `sx`, `sy`, `use_rand`,
  `merge_attn`, `merge_crossattn`, `merge_mlp`. Its random token partition is drawn from the
  image's seed at every call (tomesd's own default forks the global RNG once), so a peer image is
  reproducible from its seed like every other row's.

- `openvino`: the pipeline's UNet, VAE decoder and text encoder converted to OpenVINO and run
  by its CPU plugin (see `sdaccel.bench.openvino_peer`; CPU only). Parameter:
  `inference_precision` (default: OpenVINO's own, bf16 on a CPU with AMX or AVX512-BF16, f32
  elsewhere; or f32, bf16, f16).

A spec names a peer and optionally its parameters: `deepcache`, `deepcache:cache_interval=5`,
`tomesd:ratio=0.3,max_downsample=2`, `openvino:inference_precision=f32`. No peer package is a
dependency of sdaccel: `pip install 'sdaccel[peers]'`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sdaccel.errors import ConfigError, SdaccelError


class PeerError(SdaccelError):
    """A peer's package is missing, or it fails on this diffusers version."""

    exit_code = 1


@dataclass(frozen=True)
class Peer:
    name: str  # as on the command line
    package: str  # the distribution (pip install NAME)
    module: str  # import name
    defaults: dict[str, Any]
    shown: tuple[str, ...]  # parameters every description names (others when changed)
    apply: Callable[[Any, dict[str, Any]], Callable[[int], None] | None]  # -> per-call prepare
    # The peer runs the same arithmetic elsewhere (OpenVINO): its cost is the baseline's steps,
    # and its precision column comes from here instead of the pipeline's torch dtype.
    precision: Callable[[dict[str, Any]], str] | None = None
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)  # of a text parameter

    @property
    def same_work(self) -> bool:
        """It runs the baseline's arithmetic in another runtime (cost: the baseline's steps)."""
        return self.precision is not None


@dataclass(frozen=True)
class PeerSpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)  # every parameter, defaults filled in

    @property
    def peer(self) -> Peer:
        return PEERS[self.name]

    @property
    def label(self) -> str:
        changed = [f"{k}={v}" for k, v in self.params.items() if self.peer.defaults[k] != v]
        return self.name + (":" + ",".join(changed) if changed else "")

    def describe(self) -> str:
        """'DeepCache 0.1.1 cache_interval=3 cache_branch_id=0' (the installed version; the
        main parameters and every one that differs from the package's default)."""
        settings = " ".join(f"{k}={v}" for k, v in self.params.items()
                            if k in self.peer.shown or self.peer.defaults[k] != v)
        return f"{self.peer.package} {package_version(self.peer.package)} {settings}".strip()


def _apply_deepcache(pipe, params: dict[str, Any]):
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(**params)
    helper.enable()
    # The helper must live as long as the pipeline it wraps is called: the row's per-call
    # prepare (which has nothing to do) holds it.
    return lambda _seed, helper=helper: None


def _apply_tomesd(pipe, params: dict[str, Any]):
    import tomesd
    import torch

    tomesd.apply_patch(pipe, **params)
    info = pipe.unet._tome_info
    device = pipe.unet.device

    def prepare(seed: int) -> None:
        info["args"]["generator"] = torch.Generator(device=device).manual_seed(seed)

    return prepare


def _apply_openvino(pipe, params: dict[str, Any]):
    from sdaccel.bench.openvino_peer import apply_openvino

    return apply_openvino(pipe, params)


def _openvino_precision(params: dict[str, Any]) -> str:
    from sdaccel.bench.openvino_peer import precision_label

    return precision_label(params)


PEERS: dict[str, Peer] = {
    "deepcache": Peer("deepcache", "DeepCache", "DeepCache",
                      {"cache_interval": 3, "cache_branch_id": 0},
                      ("cache_interval", "cache_branch_id"), _apply_deepcache),
    "tomesd": Peer("tomesd", "tomesd", "tomesd",
                   {"ratio": 0.5, "max_downsample": 1, "sx": 2, "sy": 2, "use_rand": True,
                    "merge_attn": True, "merge_crossattn": False, "merge_mlp": False},
                   ("ratio", "max_downsample"), _apply_tomesd),
    "openvino": Peer("openvino", "openvino", "openvino", {"inference_precision": "default"},
                     ("inference_precision",), _apply_openvino, _openvino_precision,
                     {"inference_precision": ("default", "f32", "bf16", "f16")}),
}


def parse_peer(spec: str | PeerSpec) -> PeerSpec:
    """'deepcache' or 'deepcache:cache_interval=5,cache_branch_id=1' -> PeerSpec (values typed
    as the parameter's default); ConfigError naming what is wrong and what is valid."""
    if isinstance(spec, PeerSpec):
        return spec
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in PEERS:
        raise ConfigError(f"--peer {spec!r}: unknown peer {name!r}; valid: "
                          f"{', '.join(PEERS)}")
    peer = PEERS[name]
    params = dict(peer.defaults)
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in peer.defaults:
            raise ConfigError(f"--peer {spec!r}: expected {name}:KEY=VALUE with KEY one of "
                              f"{', '.join(peer.defaults)}; got {item!r}")
        params[key] = _typed(spec, key, text.strip(), peer.defaults[key])
        if key in peer.choices and params[key] not in peer.choices[key]:
            raise ConfigError(f"--peer {spec!r}: {key} {params[key]!r} is not one of "
                              f"{', '.join(peer.choices[key])}")
    return PeerSpec(name, params)


def _typed(spec: str, key: str, text: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return type(default)(text)
    except ValueError:
        raise ConfigError(f"--peer {spec!r}: {key} must be a {type(default).__name__}, "
                          f"got {text!r}") from None


def parse_peers(specs: Sequence[str | PeerSpec]) -> list[PeerSpec]:
    """Parse every spec and check that its package imports, before anything is measured."""
    parsed = [parse_peer(s) for s in specs]
    seen = set()
    for spec in parsed:
        if spec.label in seen:
            raise ConfigError(f"--peer {spec.label!r} is given twice")
        seen.add(spec.label)
        try:
            importlib.import_module(spec.peer.module)
        except ImportError as exc:
            raise PeerError(
                f"peer {spec.name!r} needs the {spec.peer.package} package, which does not "
                f"import here ({_first_line(exc)}): pip install 'sdaccel[peers]'") from None
    return parsed


def apply_peer(spec: PeerSpec, pipe) -> Callable[[int], None] | None:
    """Patch `pipe` in place; returns a per-call `prepare(seed)` or None. PeerError when the
    package fails on this diffusers version."""
    try:
        return spec.peer.apply(pipe, dict(spec.params))
    except Exception as exc:
        raise peer_failure(spec, exc) from exc


def peer_failure(spec: PeerSpec, exc: BaseException) -> PeerError:
    """The one-line error for a peer that raised while being applied or called."""
    import diffusers

    return PeerError(
        f"peer {spec.name!r} ({spec.peer.package} {package_version(spec.peer.package)}) failed "
        f"with diffusers {diffusers.__version__}: {type(exc).__name__}: {_first_line(exc)}")


def package_version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "(version unknown)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
