"""Model references -> loaded components.

A reference is one of:
  random:tiny | random:sd15     the architecture from configs shipped here, random weights (offline)
  random:sdxl-tiny | random:sdxl  the same for SDXL (a tiny test model; the real architecture)
  bundled:<name>                a trained model shipped inside the package (src/sdaccel/bundled/)
                                (its folder may hold vocabulary.txt: see Components.vocabulary)
  ./path/to/folder              a diffusers folder (model_index.json, unet/, vae/, ...)
  ./model.safetensors | .ckpt   a single-file checkpoint (SD 1.5 or SDXL's original layout;
                                checkpoint.py)
  org/name[@revision]           a Hugging Face hub id (from the local cache when offline)
Every kind ends as the same `Components`, so the engine never cares where weights came from.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from sdaccel.errors import ModelNotFoundError

RANDOM_ARCHS = ("tiny", "sd15", "sdxl-tiny", "sdxl")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# In a model's folder: every word its training captions used, one a line (bundled models only).
VOCABULARY_FILE = "vocabulary.txt"


@dataclass
class Components:
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    name: str  # what metadata calls the model
    source_file: str | None = None  # the single-file checkpoint it was loaded from, if any
    # Every word the model was trained on, for a model trained on a closed grammar (the bundled
    # one, from its folder's vocabulary.txt); None: any text (SD 1.5 and other models).
    vocabulary: tuple[str, ...] | None = None
    # SDXL's second text encoder (OpenCLIP ViT-bigG, with its pooled projection) and its
    # tokenizer; None for SD 1.5-class models
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: an empty negative prompt is zeros

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) of each of the model's text encoders, in order."""
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return pairs[:1 + self.is_sdxl]

    @cached_property
    def model_hash(self) -> str | None:
        """A1111's `Model hash` of a single-file model (its sha256, first 10 hex digits, hashed
        once per file), None for any other model."""
        if self.source_file is None:
            return None
        from sdaccel.engine.loading.checkpoint import model_hash

        return model_hash(self.source_file)


@dataclass(frozen=True)
class ModelRef:
    kind: str  # random | bundled | folder | single_file | hub
    location: str
    revision: str | None = None


def arch_dir(arch: str) -> Path:
    return Path(str(resources.files("sdaccel.engine.loading") / "archs" / arch))


def bundled_dir(name: str) -> Path:
    return Path(str(resources.files("sdaccel") / "bundled" / name))


def bundled_names() -> list[str]:
    root = Path(str(resources.files("sdaccel") / "bundled"))
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "model_index.json").is_file())


def parse_model_ref(ref: str) -> ModelRef:
    """Classify a reference without loading anything; unknown forms are a clear error."""
    if ref.startswith("random:"):
        arch = ref.removeprefix("random:")
        if arch not in RANDOM_ARCHS:
            raise ModelNotFoundError(
                f"model {ref!r}: unknown random architecture; valid: "
                + ", ".join(f"random:{a}" for a in RANDOM_ARCHS)
            )
        return ModelRef("random", arch)
    if ref.startswith("bundled:"):
        name = ref.removeprefix("bundled:")
        if name not in bundled_names():
            valid = ", ".join(f"bundled:{n}" for n in bundled_names()) or "none installed"
            raise ModelNotFoundError(f"model {ref!r}: no such bundled model; valid: {valid}")
        return ModelRef("folder", str(bundled_dir(name)))
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"model folder {ref!r} has no model_index.json; expected a diffusers folder "
                "(saved with pipeline.save_pretrained)"
            )
        return ModelRef("folder", str(path))
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ModelNotFoundError(f"model file {ref!r} does not exist")
        return ModelRef("single_file", str(path))
    if HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        repo, _, revision = ref.partition("@")
        return ModelRef("hub", repo, revision or None)
    raise ModelNotFoundError(
        f"model {ref!r} is not an existing folder or .safetensors/.ckpt file, a hub id "
        "(org/name[@revision]), or one of "
        + ", ".join(f"random:{a}" for a in RANDOM_ARCHS) + ", "
        + ", ".join(f"bundled:{n}" for n in bundled_names())
    )


def load_components(ref: str, device: str = "cpu", dtypes: dict[str, Any] | None = None
                    ) -> Components:
    """Load (or build) the four components of the model `ref` names, in fp32, or read from a
    file straight into the torch dtype `dtypes` gives a part ("unet", "vae", "text_encoder"):
    an fp32 copy of SD 1.5's UNet (3.4 GB) is then never held beside the one in use. Random
    weights are drawn in fp32 whatever `dtypes` says (the same weights in every precision)."""
    model = parse_model_ref(ref)
    dtypes = dtypes or {}
    try:
        if model.kind == "random":
            return _random_components(model.location, device, name=ref)
        if model.kind == "single_file":
            return _single_file_components(model.location, name=ref, dtypes=dtypes)
        return _pretrained_components(model.location, model.revision, name=ref, dtypes=dtypes)
    except ModelNotFoundError:
        raise
    except (OSError, ValueError) as exc:  # hub/cache misses and malformed folders surface so
        raise ModelNotFoundError(_not_found_message(ref, model, exc)) from exc


def _not_found_message(ref: str, model: ModelRef, exc: Exception) -> str:
    if model.kind == "hub":
        revision = f" --revision {model.revision}" if model.revision else ""
        return (
            f"model {ref!r} is not in the local Hugging Face cache and cannot be downloaded "
            "here (offline or unreachable); download it once where the hub is reachable "
            f"(`hf download {model.location}{revision}`), or pass a local folder with --model"
        )
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"model {ref!r} could not be loaded: {first_line}"


def _pretrained_components(location: str, revision: str | None, name: str,
                           dtypes: dict[str, Any]) -> Components:
    import torch
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    common: dict[str, Any] = {"revision": revision} if revision else {}

    def load(cls, part: str):
        return cls.from_pretrained(location, subfolder=part,
                                   torch_dtype=dtypes.get(part, torch.float32), **common)

    index = DiffusionPipeline.load_config(location, **common)
    sdxl = "text_encoder_2" in index
    return Components(
        unet=load(UNet2DConditionModel, "unet"),
        vae=load(AutoencoderKL, "vae"),
        text_encoder=load(CLIPTextModel, "text_encoder"),
        tokenizer=load_tokenizer(location, **common),
        scheduler_config=_scheduler_config(location, subfolder="scheduler", **common),
        name=name,
        vocabulary=read_vocabulary(location),
        text_encoder_2=load(CLIPTextModelWithProjection, "text_encoder_2") if sdxl else None,
        tokenizer_2=load_tokenizer(location, "tokenizer_2", **common) if sdxl else None,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", sdxl)),
    )


def _random_components(arch: str, device: str, name: str) -> Components:
    """The architecture's shipped configs with deterministic random weights (seed 0)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = arch_dir(arch)
    sdxl = (folder / "text_encoder_2").is_dir()
    # Build on the target device (fast for SD 1.5 on a GPU) without disturbing the caller's RNG.
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(
            folder / "text_encoder_2")).eval() if sdxl else None
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=load_tokenizer(folder),
        scheduler_config=_scheduler_config(folder / "scheduler"),
        name=name,
        text_encoder_2=text_encoder_2,
        tokenizer_2=load_tokenizer(folder, "tokenizer_2") if sdxl else None,
        force_zeros_for_empty_prompt=sdxl,
    )


def read_vocabulary(location: str | Path) -> tuple[str, ...] | None:
    """The words of a model folder's vocabulary.txt (one a line), None where the folder has
    none (a hub id, SD 1.5's configs, a user's folder)."""
    path = Path(location) / VOCABULARY_FILE
    return tuple(path.read_text(encoding="utf-8").split()) if path.is_file() else None


def load_tokenizer(location, subfolder: str = "tokenizer", **kwargs):
    """The model's own tokenizer (`subfolder`); a local folder without one (the configs shipped
    here, a user's folder) gets CLIP ViT-L/14's, SD 1.5's tokenizer
    (engine/loading/clip_tokenizer.py). SDXL's second tokenizer is OpenCLIP's: the same
    vocabulary and merges, padded with "!" instead of the end token."""
    from transformers import CLIPTokenizer

    if Path(location).is_dir() and not (Path(location) / subfolder).is_dir():
        from sdaccel.engine.loading.clip_tokenizer import clip_tokenizer

        tokenizer = clip_tokenizer()
        if subfolder == "tokenizer_2":
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.pad_token = "!"
        return tokenizer
    return CLIPTokenizer.from_pretrained(location, subfolder=subfolder, **kwargs)


def _scheduler_config(location, overrides: dict[str, Any] | None = None,
                      **kwargs) -> dict[str, Any]:
    """The model's scheduler config (with `overrides`) and its class's defaults filled in, as
    `pipe.scheduler.config` has them: samplers built from it then match diffusers' own
    `SomeScheduler.from_config(pipe.scheduler.config)` (timestep_spacing and all)."""
    import diffusers

    raw = {**diffusers.DDPMScheduler.load_config(location, **kwargs), **(overrides or {})}
    scheduler_class = getattr(diffusers, raw.get("_class_name", ""), diffusers.DDPMScheduler)
    return dict(scheduler_class.from_config(raw).config)


def _single_file_components(path: str, name: str, dtypes: dict[str, Any]) -> Components:
    """An original-layout checkpoint, converted by diffusers' own single-file loading with
    configs shipped here (engine/loading/checkpoint.py): SD 1.5's or SDXL's, as its keys say,
    or for a file written by `checkpoint.save_checkpoint` from bundled:NAME / random:tiny /
    random:sdxl-tiny, that model's. Offline; tokenizers as `load_tokenizer` builds them."""
    from sdaccel.engine.loading.checkpoint import (
        BASE_KEY,
        check_architecture,
        convert_components,
        read_checkpoint,
        schedule_markers,
    )

    state, metadata = read_checkpoint(path, ref=name)
    base = metadata.get(BASE_KEY)
    if base:  # written here from a model of its own size: its configs, checked for family
        folder = _base_folder(base, name)
        family = check_architecture(state, name, sizes=False)
        if family != ("sdxl" if (folder / "text_encoder_2").is_dir() else "sd15"):
            raise ModelNotFoundError(f"model {name!r}: its metadata says it was written from "
                                     f"{base}, but it holds an "
                                     f"{'SDXL' if family == 'sdxl' else 'SD 1.5'} checkpoint")
    else:
        folder = arch_dir(check_architecture(state, name))
    parts = convert_components(state, folder, name, dtypes)
    markers = schedule_markers(state)  # v-prediction, zero terminal SNR
    del state
    sdxl = "text_encoder_2" in parts
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    return Components(
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=load_tokenizer(folder),
        scheduler_config=_scheduler_config(folder / "scheduler", markers),
        name=name,
        source_file=path,
        vocabulary=read_vocabulary(folder),  # written from a bundled model: its words
        text_encoder_2=parts.get("text_encoder_2"),
        tokenizer_2=load_tokenizer(folder, "tokenizer_2") if sdxl else None,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", sdxl)),
    )


def _base_folder(base: str, name: str) -> Path:
    """The configs a file written here from `base` (its metadata) converts with."""
    if not base.startswith(("random:", "bundled:")):
        raise ModelNotFoundError(f"model {name!r}: its metadata names an unknown base "
                                 f"model {base!r}")
    try:
        base_ref = parse_model_ref(base)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"model {name!r} was written from {base}, which is not "
                                 "installed here") from exc
    return arch_dir(base_ref.location) if base_ref.kind == "random" else Path(base_ref.location)
