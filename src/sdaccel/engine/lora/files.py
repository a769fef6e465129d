"""LoRA files read, hashed and converted by diffusers, before any model is loaded.

A file (`.safetensors`; `.pt`/`.bin` through `torch.load(weights_only=True)`, never running code
from it) goes through `StableDiffusionXLLoraLoaderMixin.lora_state_dict` (SD 1.x's, with the
UNet block numbering SDXL's loading adds), which converts kohya/A1111 keys (`lora_unet_...`,
`lora_te_...`, SDXL's `lora_te1_...`/`lora_te2_...` and kohya's SDXL block names
`input_blocks_...`, with their `alpha`) to diffusers' and leaves diffusers/PEFT keys
(`unet....lora_A.weight`, `text_encoder....`, `text_encoder_2....`) as they are. A missing,
corrupt or foreign file fails here, fast, in one line (LoraError).

The file's family (SDXL, or a one-encoder Stable Diffusion 1.x/2.x model) is read from its keys
and shapes (`family`): an SDXL LoRA on an SD 1.x model or the reverse is one line naming the
file and what it is (`check_fits`), before the model loads where the model's family can be told
from its reference (`read_loras(..., model_id)`), else before the LoRA is applied.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from sdaccel.engine.loading.checkpoint import first_line, load_tensor_pickle
from sdaccel.engine.text.vocabulary import words
from sdaccel.errors import LoraError

# What a LoRA may change, as diffusers names them (text_encoder_2: SDXL's second encoder)
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# kohya numbers SDXL's UNet blocks as the original code does (input_blocks.4...): diffusers maps
# them with the UNet's layers_per_block, 2 in every SDXL model (checked against the model)
SGM_PREFIXES = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
SGM_LAYERS_PER_BLOCK = 2
FAMILIES = {"sdxl": "SDXL", "sd": "Stable Diffusion 1.x/2.x"}  # LoraFile.family -> its name
# Keys only one family's LoRAs have: (prefixes, family, what they are)
FAMILY_KEYS = (
    (("lora_te2_", "text_encoder_2."), "sdxl", "weights for a second text encoder (SDXL)"),
    (("lora_te1_",), "sdxl", "kohya's SDXL names for the first text encoder"),
    (SGM_PREFIXES, "sdxl", "kohya's SDXL UNet block names"),
    (("lora_te_",), "sd", "kohya's names for a single text encoder"),
)
# The width of the text features a UNet's cross-attention reads -> the family that has it
CONTEXT_WIDTHS = {768: ("sd", "SD 1.x"), 1024: ("sd", "SD 2.x"), 2048: ("sdxl", "SDXL")}


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
    family: str | None = None  # "sdxl" | "sd" (FAMILIES), None where the file does not tell
    evidence: str = ""  # what tells it ("weights for a second text encoder (SDXL) (keys ...)")
    context_width: int | None = None  # text-feature width its UNet cross-attention layers read
    sgm_blocks: bool = False  # kohya's SDXL block numbering (SGM_LAYERS_PER_BLOCK)

    def record(self, weight: float) -> dict[str, Any]:
        """What an image's metadata says about it: its settings entry (path, weight, sha256),
        complete, and the name and hash AUTOMATIC1111's infotext uses."""
        return {"path": str(self.path), "weight": weight, "sha256": self.sha256,
                "name": self.name, "short_hash": self.short_hash}


def read_loras(entries: Sequence[Any], model_id: str | None = None) -> list[LoraFile]:
    """Read every settings entry (path, weight, optional sha256); the first bad file is an
    error naming it (exit 3). With `model_id`, a file for another family than the model's (an
    SDXL LoRA on an SD 1.x model, or the reverse) is that error too, before the model loads,
    where the reference tells the family without loading it (model_is_sdxl)."""
    files = [read_lora(entry.path, entry.sha256) for entry in entries]
    sdxl = model_is_sdxl(model_id) if model_id and files else None
    if sdxl is not None:
        for lora in files:
            check_fits(lora, sdxl, model_id)
    return files


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
    family, evidence, width = lora_family(tensors)
    state_dict, alphas = _convert(tensors, given)
    if metadata is not None and alphas:
        metadata = None  # diffusers takes one or the other; kohya's alphas are the file's own
    lora = LoraFile(where.resolve(), where.stem, digest, short, state_dict, alphas, metadata,
                    trained_words(file_metadata), family=family, evidence=evidence,
                    context_width=width, sgm_blocks=_sgm_blocks(tensors))
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
    """diffusers' own reading of a LoRA state dict (kohya/A1111 keys converted), as an SDXL
    pipeline's load_lora_weights reads it (SD 1.x's reading, plus kohya's SDXL block names)."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    if not tensors:
        raise LoraError(f"LoRA file {given!r} holds no tensors")
    strangers = [key for key in tensors if "lora" not in key and "alpha" not in key]
    if strangers:
        raise LoraError(f"LoRA file {given!r} is not a LoRA: {len(strangers)} of its "
                        f"{len(tensors)} tensors are not LoRA weights (e.g. {strangers[0]!r}; "
                        "a checkpoint? give it as --model)")
    blocks = SimpleNamespace(layers_per_block=SGM_LAYERS_PER_BLOCK)
    try:
        state_dict, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(
            dict(tensors), unet_config=blocks)
    except Exception as exc:  # diffusers' conversion names the keys it could not map
        raise LoraError(f"LoRA file {given!r} is not a LoRA diffusers can read for Stable "
                        f"Diffusion 1.x or SDXL: {first_line(exc)}") from None
    return state_dict, alphas


def _sgm_blocks(tensors: dict[str, Any]) -> bool:
    return any(key.startswith(SGM_PREFIXES) for key in tensors)


# A LoRA's down (A) factor of a cross-attention key or value projection, in any naming: its
# input width is the width of the text features the UNet reads
_CONTEXT_DOWN = re.compile(r"attn2[._](?:processor[._])?to_[kv]"
                           r"(?:[._]lora[._]down|[._]lora_down|[._]lora_A)\.weight$")


def lora_family(tensors: dict[str, Any]) -> tuple[str | None, str, int | None]:
    """What a LoRA's own keys and shapes say it is for: its family ("sdxl", "sd" or None), the
    evidence in words, and the text-feature width its UNet cross-attention layers read (768 SD
    1.x, 1024 SD 2.x, 2048 SDXL; None without such layers)."""
    widths = [t.shape[-1] for key, t in tensors.items()
              if _CONTEXT_DOWN.search(key) and getattr(t, "ndim", 0) == 2]
    width = max(set(widths), key=widths.count) if widths else None
    for prefixes, family, what in FAMILY_KEYS:
        found = next((p for key in tensors for p in prefixes if key.startswith(p)), None)
        if found:
            return family, f"{what} (keys {found}...)", width
    if width in CONTEXT_WIDTHS:
        family, name = CONTEXT_WIDTHS[width]
        return family, (f"UNet cross-attention weights that read {width}-wide text features "
                        f"({name})"), width
    return None, "", width


def check_fits(lora: LoraFile, sdxl: bool, model_name: str,
               context_width: int | None = None) -> None:
    """LoraError unless `lora` is for the model's family: an SDXL LoRA on an SD 1.x model, an
    SD 1.x/2.x LoRA on an SDXL model, and (`context_width`: the width of the text features the
    model's UNet reads, its cross_attention_dim) a LoRA whose UNet reads another width."""
    given = str(lora.path)
    if lora.family == "sdxl" and not sdxl:
        raise LoraError(f"LoRA file {given!r} is not for a Stable Diffusion 1.x model: it has "
                        f"{lora.evidence}, so it is an SDXL LoRA; model {model_name} is "
                        "Stable Diffusion 1.x")
    if lora.family == "sd" and sdxl:
        raise LoraError(f"LoRA file {given!r} is not for an SDXL model: it has {lora.evidence}, "
                        f"so it is a {FAMILIES['sd']} LoRA; model {model_name} is SDXL")
    mine = lora.context_width
    if context_width and mine and mine != context_width:
        def named(width: int) -> str:
            return f" ({CONTEXT_WIDTHS[width][1]})" if width in CONTEXT_WIDTHS else ""

        raise LoraError(f"LoRA file {given!r} does not fit model {model_name}: its UNet "
                        f"cross-attention reads {mine}-wide text features{named(mine)}, the "
                        f"model's {context_width}-wide{named(context_width)}")


def model_is_sdxl(ref: str) -> bool | None:
    """Whether model `ref` is SDXL, told without loading it: a random architecture's shipped
    configs, a folder's (or a cached hub id's) model_index.json, a .safetensors checkpoint's
    header (SDXL's `conditioner.embedders.` keys). None where that takes loading it (a .ckpt, a
    hub id not cached, a reference that is wrong: loading it says what)."""
    from sdaccel.engine.loading.models import arch_dir, parse_model_ref

    try:
        model = parse_model_ref(ref)
        if model.kind == "random":
            return (arch_dir(model.location) / "text_encoder_2").is_dir()
        if model.kind == "single_file":
            return _checkpoint_is_sdxl(Path(model.location))
        index: Any = Path(model.location) / "model_index.json"
        if model.kind == "hub":
            from huggingface_hub import try_to_load_from_cache

            index = try_to_load_from_cache(model.location, "model_index.json",
                                           revision=model.revision)
            if not isinstance(index, str):
                return None
        return "text_encoder_2" in json.loads(Path(index).read_text())
    except Exception:  # the model's own loading names what is wrong with it
        return None


def _checkpoint_is_sdxl(path: Path) -> bool | None:
    if path.suffix.lower() != ".safetensors":
        return None
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size > 100_000_000:
            return None
        keys = list(json.loads(f.read(size)))
    if any(key.startswith("conditioner.embedders.") for key in keys):
        return True
    if any(key.startswith(("model.diffusion_model.", "cond_stage_model.")) for key in keys):
        return False
    return None


# diffusers' names for a kohya file's text-encoder attention layers (`...self_attn.to_k_lora.
# down.weight`) -> the CLIP modules they change
_TEXT_ATTENTION = {f".{old}_lora.": f".{new}_proj.lora." for old, new in (
    ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out", "out"))}


def _modules_by_component(state_dict: dict[str, Any], given: str) -> dict[str, set[str]]:
    """component -> the modules the file changes ("down_blocks.1....to_q")."""
    modules: dict[str, set[str]] = {}
    for key in state_dict:
        prefix, _, rest = key.partition(".")
        if prefix.startswith("text_encoder"):
            for old, new in _TEXT_ATTENTION.items():
                rest = rest.replace(old, new)
        if ".lora" not in rest:
            continue
        modules.setdefault(prefix, set()).add(rest.split(".lora")[0])
    foreign = sorted(set(modules) - set(COMPONENTS))
    if foreign:
        raise LoraError(f"LoRA file {given!r} is not for a Stable Diffusion 1.x or SDXL model: "
                        f"it has weights for {', '.join(foreign)} (those models have "
                        f"{', '.join(COMPONENTS)})")
    if not modules:
        raise LoraError(f"LoRA file {given!r} holds no LoRA layers (lora_down/lora_up or "
                        "lora_A/lora_B weights)")
    return modules
