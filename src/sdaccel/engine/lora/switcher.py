"""The LoRA set in force on one engine's UNet and text encoders (SDXL's second one too), switched
between batches without reloading the model or recompiling it.

**Fused** (the default): the weight of every module a LoRA set touches becomes its original value
plus the weighted sum of the PEFT layers' `get_delta_weight` (the LoRA's B @ A x alpha / rank),
computed in fp32 and written in place, into the same storage: compiled graphs and CUDA graphs,
which take the weights as inputs, read the new values with no recompile. The original of every
weight a LoRA ever touched is kept (on the CPU), so switching to another set, or to none, writes
exact originals first: no drift however often the set changes, and no LoRA gives back the base
image bit for bit. Nothing changes when the set is the one already in force. Weights a speed pass
derived from the rewritten ones follow through the hooks it registered (lora/hooks.py).

**Unfused** (PEFT layers left in the model and active, as diffusers without `fuse_lora`): for an
int8 (bitsandbytes) text encoder, whose int8 weights cannot take a delta exactly, and on request
(`LoraSwitcher(..., unfused=...)`) for comparisons. Its modules change, so a compiled UNet would
recompile: the UNet is only ever unfused on request.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdaccel.engine.lora.files import LoraFile, read_lora
from sdaccel.engine.lora.hooks import weights_changed
from sdaccel.engine.lora.injection import (
    ADAPTER,
    Untouched,
    attach,
    inject,
    peft_layers,
    quiet_libraries,
    take_out,
)


@dataclass
class _Target:
    """One module a LoRA set changes: its weight's original (exact, on the CPU) and what is in
    it now."""

    module: torch.nn.Module
    original: torch.Tensor
    current: tuple[tuple[int, float], ...] = ()  # (id of PEFT layer, weight) summed in now


class LoraSwitcher:
    """The LoRA set in force on one engine's UNet and text encoders, and the switch to another.

    `models`: component -> model, as diffusers names them ("unet", "text_encoder", and for SDXL
    "text_encoder_2", whose presence makes the model SDXL to the family check; a None model is
    left out). `apply(entries)` makes `entries` (settings entries: path, weight, sha256) the set
    in force and returns their metadata records; files are read once and kept. `unfused`: the
    components whose LoRAs run as active PEFT layers instead of fused weights (names of
    components the model lacks are ignored)."""

    def __init__(self, models: dict[str, torch.nn.Module | None], model_name: str,
                 unfused: Sequence[str] = ()) -> None:
        self.models = {name: model for name, model in models.items() if model is not None}
        self.model_name = model_name
        self.unfused = set(unfused) & set(self.models)
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

    @property
    def originals_bytes(self) -> int:
        """Memory the exact originals take (on the CPU): every weight a LoRA ever touched."""
        return sum(t.original.numel() * t.original.element_size()
                   for t in self._targets.values())

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
            self._layers[path] = attach(lora, self.models, self.model_name)
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
        self._tell_hooks(changed)

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
                with quiet_libraries():
                    inject(component, model, lora, f"{ADAPTER}_{k}")
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
            if peft_layers(model):
                untouched = Untouched(model)
                take_out(model)
                untouched.restore()
                model.__dict__.pop("peft_config", None)
                model.__dict__.pop("_hf_peft_config_loaded", None)
        self._unfused_active = ()

    def _reset(self) -> None:
        """After a failed switch: no LoRA in force anywhere (exact originals)."""
        changed = set()
        for key, target in self._targets.items():
            if target.current:
                target.module.weight.copy_(target.original)
                target.current = ()
                changed.add(key)
        self._tell_hooks(changed)
        self._unload_unfused()
        self._active = ()

    def _tell_hooks(self, changed: set[tuple[str, str]]) -> None:
        """Weights derived from the ones just rewritten (a speed pass's) follow them."""
        for component, model in self.models.items():
            weights_changed(model, {name for c, name in changed if c == component})
