"""LoRA files read, hashed and converted by diffusers, before any model is loaded.

A file (`.safetensors`; `.pt`/`.bin` through `torch.load(weights_only=True)`, never running code
from it) goes through `StableDiffusionLoraLoaderMixin.lora_state_dict`, which converts
kohya/A1111 keys (`lora_unet_...`, `lora_te_...`, with their `alpha`) to diffusers' and leaves
diffusers/PEFT keys (`unet....lora_A.weight`, `text_encoder....`) as they are. A missing,
corrupt or foreign file fails here, fast, in one line (LoraError).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdaccel.engine.loading.checkpoint import first_line, load_tensor_pickle
from sdaccel.engine.text.vocabulary import words
from sdaccel.errors import LoraError

COMPONENTS = ("unet", "text_encoder")  # what an SD 1.x LoRA may change, as diffusers names them
# Prefixes of weights an SD 1.x model does not have: SDXL's second text encoder.
FOREIGN_PREFIXES = {"lora_te2_": "a second text encoder (SDXL)",
                    "text_encoder_2.": "a second text encoder (SDXL)"}


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
    return frozenset(w for text in texts for w in words(text))


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
