"""LoRA files fused into the engine's weights, switched between batches without reloading the
model or recompiling it.

A file is read by diffusers' own LoRA loading, in two steps:

1. `read_lora` (before the model loads: a missing, corrupt or foreign file fails fast): the file
   (`.safetensors`; `.pt`/`.bin` through `torch.load(weights_only=True)`, never running code
   from it) -> `StableDiffusionLoraLoaderMixin.lora_state_dict`, which converts kohya/A1111 keys
   (`lora_unet_...`, `lora_te_...`, with their `alpha`) to diffusers' and leaves diffusers/PEFT
   keys (`unet....lora_A.weight`, `text_encoder....`) as they are;
2. `LoraSwitcher` (on the loaded model): `load_lora_into_unet` / `load_lora_into_text_encoder`
   inject PEFT layers holding the file into the model, exactly as a diffusers pipeline's
   `load_lora_weights` does. sdaccel checks that every layer of the file found its module, then
   takes the PEFT layers out again: the model's modules are the very objects they were, so a
   compiled UNet keeps its graph. The PEFT layers are kept aside, one set per file.

**Fused** (the default): the weight of every module a LoRA set touches becomes its original value
plus the weighted sum of the PEFT layers' `get_delta_weight` (the LoRA's B @ A x alpha / rank),
computed in fp32 and written in place, into the same storage: compiled graphs and CUDA graphs,
which take the weights as inputs, read the new values with no recompile. The original of every
weight a LoRA ever touched is kept (on the CPU), so switching to another set, or to none, writes
exact originals first: no drift however often the set changes, and no LoRA gives back the base
image bit for bit. Nothing changes when the set is the one already in force.

**Unfused** (PEFT layers left in the model and active, as diffusers without `fuse_lora`): for an
int8 (bitsandbytes) text encoder, whose int8 weights cannot take a delta exactly, and on request
(`LoraSwitcher.unfused`) for comparisons. Its modules change, so a compiled UNet would recompile:
the UNet is only ever unfused on request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdaccel.engine.loading.checkpoint import first_line, load_tensor_pickle
from sdaccel.errors import LoraError

COMPONENTS = ("unet", "text_encoder")  # what an SD 1.x LoRA may change, as diffusers names them
ADAPTER = "sdaccel"  # the PEFT adapter name of a file's kept-aside layers
# Prefixes of weights an SD 1.x model does not have: SDXL's second text encoder.
FOREIGN_PREFIXES = {"lora_te2_": "a second text encoder (SDXL)",
                    "text_encoder_2.": "a second text encoder (SDXL)"}


LORA_TAG = re.compile(r"<lora:[^>]*>", re.IGNORECASE)


def prompt_tags(texts: Sequence[str]) -> list[str]:
    """AUTOMATIC1111's `<lora:name:weight>` tags in prompts: sdaccel does not read them (it
    would need a folder to look names up in); LoRAs come from --lora / `loras:`."""
    return list(dict.fromkeys(tag for text in texts for tag in LORA_TAG.findall(text)))




# --------------------------------------------------------------------------- reading files


@dataclass
class LoraFile:
    """One LoRA file read and converted by diffusers, not yet applied to a model."""

    path: Path  # absolute
    name: str  # the file's stem: what AUTOMATIC1111 calls it (<lora:name:weight>)
    sha256: str  # of the whole file
    short_hash: str  # AUTOMATIC1111's "Lora hashes" value: 12 hex digits of its AutoV3 hash
    state_dict: dict[str, Any]  # diffusers' conversion (CPU tensors)
    network_alphas: dict[str, float] | None  # kohya's alphas, when the file had them
    metadata: dict[str, Any] | None  # diffusers' adapter metadata (rank, alpha), when saved
    # the words it was trained on, from the file's metadata; None when the file does not say
    trained_words: frozenset[str] | None = None
    modules: dict[str, set[str]] = field(default_factory=dict)  # component -> module names

    def record(self, weight: float) -> dict[str, Any]:
        """What an image's metadata says about it: its settings entry (path, weight, sha256),
        complete, and the name and hash AUTOMATIC1111's infotext uses."""
        return {"path": str(self.path), "weight": weight, "sha256": self.sha256,
                "name": self.name, "short_hash": self.short_hash}


def read_loras(entries: Sequence[Any]) -> list[LoraFile]:
    """Read every settings entry (path, weight, optional sha256); the first bad file is an
    error naming it (exit 3)."""
    return [read_lora(entry.path, entry.sha256) for entry in entries]


def read_lora(path: str | Path, sha256: str | None = None) -> LoraFile:
    given = str(path)
    where = Path(path).expanduser()
    if where.is_dir():
        raise LoraError(f"LoRA {given!r} is a folder; give the .safetensors file in it")
    if not where.is_file():
        raise LoraError(f"LoRA file {given!r} does not exist")
    try:
        data = where.read_bytes()
    except OSError as exc:
        raise LoraError(f"LoRA file {given!r} cannot be read: {exc.strerror or exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and sha256.lower() != digest:
        raise LoraError(f"LoRA file {given!r} has sha256 {digest[:12]}…, the settings ask for "
                        f"{sha256[:12]}… (not the file the settings were made with)")
    if where.suffix.lower() == ".safetensors" or data[8:9] == b"{":
        tensors, header = _load_safetensors(data, given)
        # AUTOMATIC1111 (and kohya's trainer) hash a .safetensors LoRA's tensor data only, so
        # that editing its metadata keeps the hash ("AutoV3"); other files: the whole file.
        short = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
        file_metadata = header.get("__metadata__") or {}
        raw = file_metadata.get("lora_adapter_metadata")
        try:
            metadata = json.loads(raw) if raw else None
        except ValueError:
            metadata = None
    else:
        tensors, metadata, short = _load_pickle(data, given), None, digest[:12]
        file_metadata = {}
    state_dict, alphas = _convert(tensors, given)
    if metadata is not None and alphas:
        metadata = None  # diffusers takes one or the other; kohya's alphas are the file's own
    lora = LoraFile(where.resolve(), where.stem, digest, short, state_dict, alphas, metadata,
                    trained_words(file_metadata))
    lora.modules = _modules_by_component(state_dict, given)
    return lora


def trained_words(file_metadata: dict[str, str]) -> frozenset[str] | None:
    """The words a LoRA was trained on, as its .safetensors metadata states them: kohya's
    `ss_tag_frequency` (JSON: folder -> caption tag -> count) and ModelSpec's
    `modelspec.trigger_phrase`. None when it states neither (most files from other trainers)."""
    texts = []
    if phrase := file_metadata.get("modelspec.trigger_phrase"):
        texts.append(phrase)
    try:
        folders = json.loads(file_metadata.get("ss_tag_frequency") or "{}")
        texts += [tag for tags in folders.values() if isinstance(tags, dict) for tag in tags]
    except (ValueError, AttributeError, TypeError):
        pass  # a malformed optional field: the file still loads, it just lists no words
    if not texts:
        return None
    return frozenset(w for text in texts for w in re.findall(r"[a-z0-9']+", text.lower()))


def _load_safetensors(data: bytes, given: str) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load

    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
        return load(data), header
    except Exception as exc:  # SafetensorError, a header that is not JSON, a short file
        raise LoraError(f"LoRA file {given!r} is not a readable .safetensors file (truncated "
                        f"or corrupt?): {first_line(exc)}") from None


def _load_pickle(data: bytes, given: str) -> dict[str, Any]:
    state = load_tensor_pickle(data, f"LoRA file {given!r}", LoraError)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise LoraError(f"LoRA file {given!r} does not hold a dictionary of tensors")
    return state


def _convert(tensors: dict[str, Any], given: str) -> tuple[dict[str, Any], dict | None]:
    """diffusers' own reading of a LoRA state dict (kohya/A1111 keys converted)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    if not tensors:
        raise LoraError(f"LoRA file {given!r} holds no tensors")
    for prefix, what in FOREIGN_PREFIXES.items():
        if any(key.startswith(prefix) for key in tensors):
            raise LoraError(f"LoRA file {given!r} is not for a Stable Diffusion 1.x model: it "
                            f"has weights for {what} (keys {prefix}...)")
    strangers = [key for key in tensors if "lora" not in key and "alpha" not in key]
    if strangers:
        raise LoraError(f"LoRA file {given!r} is not a LoRA: {len(strangers)} of its "
                        f"{len(tensors)} tensors are not LoRA weights (e.g. {strangers[0]!r}; "
                        "a checkpoint? give it as --model)")
    try:
        state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(dict(tensors))
    except Exception as exc:  # diffusers' conversion names the keys it could not map
        raise LoraError(f"LoRA file {given!r} is not a LoRA diffusers can read for Stable "
                        f"Diffusion 1.x: {first_line(exc)}") from None
    return state_dict, alphas


# diffusers' names for a kohya file's text-encoder attention layers (`...self_attn.to_k_lora.
# down.weight`) -> the CLIP modules they change
_TEXT_ATTENTION = {f".{old}_lora.": f".{new}_proj.lora." for old, new in (
    ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out", "out"))}


def _modules_by_component(state_dict: dict[str, Any], given: str) -> dict[str, set[str]]:
    """component -> the modules the file changes ("down_blocks.1....to_q")."""
    modules: dict[str, set[str]] = {}
    for key in state_dict:
        prefix, _, rest = key.partition(".")
        if prefix == "text_encoder":
            for old, new in _TEXT_ATTENTION.items():
                rest = rest.replace(old, new)
        if ".lora" not in rest:
            continue
        modules.setdefault(prefix, set()).add(rest.split(".lora")[0])
    foreign = sorted(set(modules) - set(COMPONENTS))
    if foreign:
        raise LoraError(f"LoRA file {given!r} is not for a Stable Diffusion 1.x model: it has "
                        f"weights for {', '.join(foreign)} (an SD 1.x model has "
                        f"{' and '.join(COMPONENTS)})")
    if not modules:
        raise LoraError(f"LoRA file {given!r} holds no LoRA layers (lora_down/lora_up or "
                        "lora_A/lora_B weights)")
    return modules


# --------------------------------------------------------------------------- the model's side


def _inject(component: str, model: torch.nn.Module, lora: LoraFile, adapter: str) -> None:
    """PEFT layers holding `lora` in `model`: diffusers' load_lora_into_unet, and for the text
    encoder the steps of diffusers' load_lora_into_text_encoder."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    if component == "unet":
        # low_cpu_mem_usage: the layers take the file's tensors, never a random init first (the
        # default of diffusers' load_lora_weights)
        Loader.load_lora_into_unet(lora.state_dict, lora.network_alphas, unet=model,
                                   adapter_name=adapter, metadata=lora.metadata,
                                   low_cpu_mem_usage=True)
    else:
        _inject_text_encoder(model, lora, adapter)


def _inject_text_encoder(model: torch.nn.Module, lora: LoraFile, adapter: str) -> None:
    """diffusers' `_load_lora_into_text_encoder`, step for step (its key conversions, rank
    per layer and LoraConfig), but injecting with PEFT directly rather than through
    transformers' `load_adapter` (diffusers' last step), so this module knows every layer it
    changes and keeps its exact original."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    prefix = "text_encoder"
    state_dict = {k.removeprefix(f"{prefix}."): v for k, v in lora.state_dict.items()
                  if k.startswith(f"{prefix}.")}
    metadata = None if lora.metadata is None else {
        k.removeprefix(f"{prefix}."): v for k, v in lora.metadata.items()
        if k.startswith(f"{prefix}.")}
    state_dict = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict))
    if not hasattr(model, "text_model"):
        state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    rank = {}
    for name, _ in model.named_modules():
        if name.endswith((".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")):
            key = f"{name}.lora_B.weight"
            if key in state_dict:
                rank[key] = state_dict[key].shape[1]
    alphas = None
    if lora.network_alphas is not None:
        alphas = {k.removeprefix(f"{prefix}."): v for k, v in lora.network_alphas.items()
                  if k.split(".")[0] == prefix}
    config = _create_lora_config(state_dict, alphas, metadata, rank, is_unet=False)
    inject_adapter_in_model(config, model, adapter_name=adapter, low_cpu_mem_usage=True)
    set_peft_model_state_dict(model, state_dict, adapter_name=adapter, low_cpu_mem_usage=True)


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """diffusers logs a failed injection as an error and PEFT warns about keys; sdaccel says what
    is wrong in its own one line (the LoraError) instead."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _peft_layers(model: torch.nn.Module) -> dict[str, Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: module for name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer)}


class _Untouched:
    """What PEFT changes on a model besides its modules, put back as it was: requires_grad of
    every parameter (PEFT freezes all but its own) and the adapter bookkeeping attributes."""

    ATTRIBUTES = ("peft_config", "_hf_peft_config_loaded")

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.grads = {name: p.requires_grad for name, p in model.named_parameters()}
        self.attributes = {a: model.__dict__[a] for a in self.ATTRIBUTES if a in model.__dict__}

    def restore(self) -> None:
        for name, p in self.model.named_parameters():
            if name in self.grads:
                p.requires_grad_(self.grads[name])
        for attribute in self.ATTRIBUTES:
            if attribute in self.attributes:
                self.model.__dict__[attribute] = self.attributes[attribute]
            else:
                self.model.__dict__.pop(attribute, None)


def _take_out(model: torch.nn.Module) -> dict[str, Any]:
    """Every PEFT layer out of `model`, its original module back in its place; returns them."""
    layers = _peft_layers(model)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return layers


def _strip_text_model(name: str, model: torch.nn.Module) -> str:
    # transformers 5's CLIPTextModel has no `text_model.` level; diffusers drops it as well
    return name.removeprefix("text_model.") if not hasattr(model, "text_model") else name


def _attach(lora: LoraFile, models: dict[str, torch.nn.Module],
            model_name: str) -> dict[str, dict[str, Any]]:
    """Inject `lora` into each model through diffusers, check that every layer of the file
    found its module, take the PEFT layers out again; returns them, component -> module name
    -> PEFT layer holding the adapter ADAPTER (its factors in fp32)."""
    attached: dict[str, dict[str, Any]] = {}
    for component, wanted in lora.modules.items():
        model = models[component]
        untouched = _Untouched(model)
        try:
            with _quiet_libraries():
                _inject(component, model, lora, ADAPTER)
        except Exception as exc:
            raise LoraError(_misfit(lora, component, model_name, exc)) from None
        finally:
            layers = _take_out(model)
            untouched.restore()
        names = {_strip_text_model(n, model) for n in wanted}
        missing = sorted(names - set(layers))
        if missing:
            raise LoraError(
                f"LoRA file {str(lora.path)!r} does not fit model {model_name}: {len(missing)} "
                f"of its {len(names)} {component} layers have no such module in the model "
                f"(e.g. {missing[0]!r}); made for another architecture (SD 2.x, SDXL)?")
        for layer in layers.values():
            if getattr(layer, "lora_bias", {}).get(ADAPTER) or \
                    getattr(layer, "use_dora", {}).get(ADAPTER):
                raise LoraError(f"LoRA file {str(lora.path)!r}: LoRA with bias or DoRA "
                                "layers is not supported")
            layer.lora_A[ADAPTER].float()
            layer.lora_B[ADAPTER].float()
        attached[component] = layers
    return attached


def _misfit(lora: LoraFile, component: str, model_name: str, exc: Exception) -> str:
    text = str(exc)
    found = re.search(r"size mismatch for (\S+?)\.lora_\w+?\.[^:]*: copying a param with shape "
                      r"torch\.Size\((\[.*?\])\).*?current model is torch\.Size\((\[.*?\])\)", text)
    if found or "size mismatch" in text:
        detail = (f"{component} layer {found[1]}: the file's LoRA weight is {found[2]}, the "
                  f"model's {found[3]}" if found else first_line(exc))
        return (f"LoRA file {str(lora.path)!r} does not fit model {model_name} ({detail}); "
                "made for another architecture (SD 2.x, SDXL)?")
    return (f"LoRA file {str(lora.path)!r} cannot be applied to the {component} of model "
            f"{model_name}: {first_line(exc)}")


@dataclass
class _Target:
    """One module a LoRA set changes: its weight's original (exact, on the CPU) and what is in
    it now."""

    module: torch.nn.Module
    original: torch.Tensor
    current: tuple[tuple[int, float], ...] = ()  # (id of PEFT layer, weight) summed in now


class LoraSwitcher:
    """The LoRA set in force on one engine's UNet and text encoder, and the switch to another.

    `apply(entries)` makes `entries` (settings entries: path, weight, sha256) the set in force and
    returns their metadata records; files are read once and kept. `unfused`: the components
    whose LoRAs run as active PEFT layers instead of fused weights."""

    def __init__(self, models: dict[str, torch.nn.Module], model_name: str,
                 unfused: Sequence[str] = ()) -> None:
        self.models = models
        self.model_name = model_name
        self.unfused = set(unfused)
        # wall time of the last apply() that changed the set: reading and checking a file the
        # first time it is used, then writing the weights
        self.last_switch_seconds = 0.0
        self.switches = 0  # switches that changed the weights
        self._files: dict[Path, LoraFile] = {}
        self._layers: dict[Path, dict[str, dict[str, Any]]] = {}
        self._targets: dict[tuple[str, str], _Target] = {}
        self._active: tuple[tuple[Path, float], ...] = ()
        self._unfused_active: tuple[tuple[Path, float], ...] = ()

    @property
    def active(self) -> tuple[tuple[Path, float], ...]:
        """(absolute path, weight) of each LoRA in force, weight 0 left out."""
        return self._active

    def in_force(self) -> list[LoraFile]:
        """The files of the LoRAs in force, weight 0 left out."""
        return [self._files[path] for path, _ in self._active]

    def add_files(self, files: Sequence[LoraFile]) -> None:
        """Files read before the model loaded (read_loras), kept for apply()."""
        for lora in files:
            self._files.setdefault(lora.path, lora)

    def prepare(self, entries: Sequence[Any]) -> list[LoraFile]:
        """Read each entry's file and check it fits the model, without changing the set in
        force (a prompts file's LoRAs, checked before anything is generated)."""
        with torch.inference_mode(False), torch.no_grad():
            return [self._read(entry) for entry in entries]

    def apply(self, entries: Sequence[Any]) -> tuple[dict[str, Any], ...]:
        """Make `entries` the set in force; returns each entry's metadata record."""
        started = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad():
            files = [(self._read(entry), float(entry.weight)) for entry in entries]
            wanted = tuple((lora.path, w) for lora, w in files if w != 0)
            records = tuple(lora.record(w) for lora, w in files)
            if wanted == self._active and (not self.unfused or wanted == self._unfused_active):
                return records
            try:
                self._fuse(files)
                self._activate_unfused(files)
            except BaseException:
                self._reset()
                raise
            self._active = wanted
            self.switches += 1
            self.last_switch_seconds = time.perf_counter() - started
            return records

    # ---------------------------------------------------------------- reading, attaching

    def _read(self, entry: Any) -> LoraFile:
        path = Path(entry.path).expanduser().resolve()
        lora = self._files.get(path)
        if lora is None:
            lora = self._files[path] = read_lora(entry.path, entry.sha256)
        elif entry.sha256 is not None and entry.sha256.lower() != lora.sha256:
            read_lora(entry.path, entry.sha256)  # the file changed since: the error says so
        if path not in self._layers:
            if self._unfused_active:
                self._unload_unfused()  # attaching needs every model without PEFT layers
            self._layers[path] = _attach(lora, self.models, self.model_name)
        return lora

    # ---------------------------------------------------------------- fused

    def _fuse(self, files: list[tuple[LoraFile, float]]) -> None:
        """Each targeted weight := original + sum(weight x delta), in fp32, in place."""
        sums: dict[tuple[str, str], list[tuple[Any, float]]] = {}
        for lora, weight in files:
            if weight == 0:
                continue
            for component, layers in self._layers[lora.path].items():
                if component in self.unfused:
                    continue
                for name, layer in layers.items():
                    sums.setdefault((component, name), []).append((layer, weight))
        changed: set[tuple[str, str]] = set()
        for key, target in self._targets.items():
            if key not in sums and target.current:
                target.module.weight.copy_(target.original)
                target.current = ()
                changed.add(key)
        for key, items in sums.items():
            target = self._targets.get(key)
            if target is None:
                module = items[0][0].get_base_layer()
                weight = module.weight
                original = torch.empty(weight.shape, dtype=weight.dtype, device="cpu",
                                       pin_memory=weight.is_cuda)
                original.copy_(weight.detach())
                target = self._targets[key] = _Target(module, original)
            signature = tuple((id(layer), w) for layer, w in items)
            if signature == target.current:
                continue
            weight = target.module.weight
            # fp32 in place where the weight is fp32 (bit for bit the same sum), else in fp32
            # beside it, then cast once
            total = weight if weight.dtype == torch.float32 else torch.empty(
                weight.shape, dtype=torch.float32, device=weight.device)
            total.copy_(target.original)
            for layer, w in items:
                total.add_(layer.get_delta_weight(ADAPTER).to(torch.float32), alpha=w)
            if total is not weight:
                weight.copy_(total)
            target.current = signature
            changed.add(key)
        self._sync_fused_projections(changed)

    def _sync_fused_projections(self, changed: set[tuple[str, str]]) -> None:
        """optimize.fuse_qkv runs attention through one to_qkv (to_kv) projection made from
        to_q, to_k, to_v: rebuilt, in place, where a LoRA changed one of them."""
        parents = {(component, name.rpartition(".")[0]) for component, name in changed
                   if name.rpartition(".")[2] in ("to_q", "to_k", "to_v")}
        for component, parent in parents:
            attention = self.models[component].get_submodule(parent)
            if not getattr(attention, "fused_projections", False):
                continue
            if getattr(attention, "to_qkv", None) is not None:
                attention.to_qkv.weight.copy_(torch.cat(
                    [attention.to_q.weight, attention.to_k.weight, attention.to_v.weight]))
            if getattr(attention, "to_kv", None) is not None:
                attention.to_kv.weight.copy_(torch.cat(
                    [attention.to_k.weight, attention.to_v.weight]))

    # ---------------------------------------------------------------- unfused

    def _activate_unfused(self, files: list[tuple[LoraFile, float]]) -> None:
        wanted = tuple((lora.path, w) for lora, w in files if w != 0)
        if not self.unfused or wanted == self._unfused_active:
            return
        self._unload_unfused()
        for component in sorted(self.unfused):
            model = self.models[component]
            grads = {name: p.requires_grad for name, p in model.named_parameters()}
            names, weights = [], []
            for k, (lora, weight) in enumerate(files):
                if weight == 0 or component not in lora.modules:
                    continue
                with _quiet_libraries():
                    _inject(component, model, lora, f"{ADAPTER}_{k}")
                names.append(f"{ADAPTER}_{k}")
                weights.append(weight)
            if names:
                if component == "unet":
                    model.set_adapters(names, weights)
                else:
                    from diffusers.loaders.lora_base import set_adapters_for_text_encoder

                    set_adapters_for_text_encoder(names, model, weights)
            for name, p in model.named_parameters():  # PEFT froze the rest; put it back
                if name in grads:
                    p.requires_grad_(grads[name])
        self._unfused_active = wanted

    def _unload_unfused(self) -> None:
        for component in self.unfused:
            model = self.models[component]
            if _peft_layers(model):
                untouched = _Untouched(model)
                _take_out(model)
                untouched.restore()
                model.__dict__.pop("peft_config", None)
                model.__dict__.pop("_hf_peft_config_loaded", None)
        self._unfused_active = ()

    def _reset(self) -> None:
        """After a failed switch: no LoRA in force anywhere (exact originals)."""
        for target in self._targets.values():
            if target.current:
                target.module.weight.copy_(target.original)
                target.current = ()
        self._unload_unfused()
        self._active = ()
