"""Tiny decoders: TAESD (diffusers' `AutoencoderTiny`) in place of the model's full VAE decoder.

A reference (the `tiny_decoder` setting) is one of:
  ./taesd_decoder.safetensors | .pth   TAESD's own file (madebyollin/taesd): the decoder alone,
                                       a bare nn.Sequential state dict (keys "1.weight", ...)
  ./diffusion_pytorch_model.safetensors  a diffusers AutoencoderTiny's weights (decoder.layers.*)
  ./taesd                              a diffusers AutoencoderTiny folder (config.json + weights),
                                       or a folder holding taesd_decoder.safetensors
  org/name[@revision]                  a hub id (madebyollin/taesd), from the local cache offline

Files are read safely: `.safetensors` holds tensors only; a `.pth` is read with
`torch.load(weights_only=True)` (checkpoint.load_tensor_pickle). TAESD's own files hold no
config: the model is built from `archs/taesd/config.json` (madebyollin/taesd's), its latent
channel count read from the file's first convolution.

Conventions (as diffusers' StableDiffusionPipeline with `vae=AutoencoderTiny`): the latents are
divided by the decoder's `scaling_factor`, which is 1.0 (TAESD decodes the UNet's latents as
they are, where the VAE takes them / 0.18215); `AutoencoderTiny.decode` returns [-1, 1] like
the VAE (DecoderTiny maps TAESD's [0, 1] output there), so postprocessing is the same.

SDXL's taesdxl has TAESD's architecture exactly; only its weights differ, and nothing in the
file says which latent space they were trained on. It is refused by its name (taesdxl) only; a
renamed copy is not detected (it decodes SD 1.5's latents into wrong colours).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdaccel.engine.loading.checkpoint import first_line, load_tensor_pickle
from sdaccel.engine.loading.models import HUB_ID, arch_dir
from sdaccel.errors import ModelNotFoundError

FILE_SUFFIXES = (".safetensors", ".pth", ".pt")
TAESD_FILES = ("taesd_decoder.safetensors", "taesd_decoder.pth")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
VALID = ("valid: TAESD's taesd_decoder.safetensors (or .pth), a diffusers AutoencoderTiny "
         "folder, or a hub id such as madebyollin/taesd")

# The one key mapping between the two layouts. TAESD's decoder is nn.Sequential(Clamp(), conv,
# ReLU, blocks...); diffusers' DecoderTiny applies the clamp (tanh(x / 3) * 3) in its forward,
# so its `layers` Sequential starts at the conv: TAESD index = diffusers index + 1 (diffusers'
# scripts/convert_tiny_autoencoder_to_diffusers.py subtracts the same 1).
TAESD_INDEX_OFFSET = 1
DECODER_LAYERS = "layers."  # DecoderTiny's Sequential, inside AutoencoderTiny's `decoder.`
_INDEXED = re.compile(r"^(\d+)\.(.+)$")


def taesd_to_diffusers(state: dict[str, Any]) -> dict[str, Any]:
    """TAESD's decoder state dict ("1.weight") -> DecoderTiny's ("layers.0.weight")."""
    out = {}
    for key, value in state.items():
        index, rest = _INDEXED.match(key).groups()
        out[f"{DECODER_LAYERS}{int(index) - TAESD_INDEX_OFFSET}.{rest}"] = value
    return out


def diffusers_to_taesd(state: dict[str, Any]) -> dict[str, Any]:
    """DecoderTiny's state dict ("layers.0.weight") -> TAESD's decoder file ("1.weight")."""
    out = {}
    for key, value in state.items():
        index, rest = _INDEXED.match(key.removeprefix(DECODER_LAYERS)).groups()
        out[f"{int(index) + TAESD_INDEX_OFFSET}.{rest}"] = value
    return out


@dataclass
class TinyDecoder:
    """A tiny decoder, read and checked, in fp32 on the CPU (the engine casts and moves it)."""

    model: Any  # diffusers.AutoencoderTiny; its encoder is None (decoding needs none)
    reference: str  # as the settings give it
    weights: Path  # the file its weights came from (absolute; a hub file: in its snapshot)
    sha256: str  # of that file
    # What A1111's `VAE:` field calls it: the weights file's name; for a diffusers folder, whose
    # file is always diffusion_pytorch_model.safetensors, the folder's; for a hub id, the repo's.
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            folder = self.weights.name == DIFFUSERS_WEIGHTS and self.weights.parent.name
            self.name = folder or self.weights.name

    @property
    def latent_channels(self) -> int:
        return self.model.config.latent_channels

    def record(self) -> dict[str, str]:
        """What an image's metadata records of it."""
        return {"path": str(self.weights), "name": self.name, "sha256": self.sha256}


def read_tiny_decoder(reference: str) -> TinyDecoder:
    """The tiny decoder `reference` names; every problem is one ModelNotFoundError (exit 3)
    naming it and what is valid."""
    _refuse_sdxl(Path(reference).name, reference)  # a file, a folder or a hub repo's name
    path = Path(reference).expanduser()
    if path.is_dir():
        return _from_folder(path, reference)
    if path.suffix.lower() in FILE_SUFFIXES:
        if not path.is_file():
            raise ModelNotFoundError(f"tiny_decoder {reference!r} does not exist; {VALID}")
        return _from_file(path, reference, config=None)
    if HUB_ID.match(reference) and not reference.startswith((".", "/", "~")):
        tiny = _from_folder(_hub_snapshot(reference), reference)
        tiny.name = reference.partition("@")[0].split("/")[-1]  # not the snapshot's commit
        return tiny
    raise ModelNotFoundError(f"tiny_decoder {reference!r} is not an existing folder or "
                             f"{'/'.join(FILE_SUFFIXES)} file, nor a hub id; {VALID}")


def _refuse_sdxl(name: str, reference: str) -> None:
    """SDXL's TAESD is TAESD's architecture with other weights: its name is all that tells."""
    if "taesdxl" in name.lower():
        raise ModelNotFoundError(
            f"tiny_decoder {reference!r} is SDXL's TAESD (taesdxl), made for SDXL's latent "
            "space; Stable Diffusion 1.5 models need taesd_decoder.safetensors "
            "(madebyollin/taesd)")


def _hub_snapshot(reference: str) -> Path:
    """The cached snapshot of a hub repo (downloaded only where the hub is reachable and
    HF_HUB_OFFLINE is unset); a miss is an error saying what to give instead."""
    from huggingface_hub import snapshot_download

    repo, _, revision = reference.partition("@")
    try:
        return Path(snapshot_download(repo, revision=revision or None,
                                      allow_patterns=["config.json", DIFFUSERS_WEIGHTS,
                                                      *TAESD_FILES]))
    except Exception as exc:  # LocalEntryNotFoundError offline, HTTP errors online
        raise ModelNotFoundError(
            f"tiny_decoder {reference!r} is not in the local Hugging Face cache and cannot be "
            f"downloaded here (offline or unreachable: {first_line(exc)[:120]}); download it "
            f"once where the hub is reachable (`hf download {repo}`), or give the file "
            "taesd_decoder.safetensors or an AutoencoderTiny folder") from None


def _from_folder(folder: Path, reference: str) -> TinyDecoder:
    """A diffusers AutoencoderTiny folder (its config.json decides the architecture), else a
    folder holding TAESD's own decoder file."""
    config_file = folder / "config.json"
    if config_file.is_file():
        config = _folder_config(config_file, reference)
        weights = folder / DIFFUSERS_WEIGHTS
        if not weights.is_file():
            raise ModelNotFoundError(f"tiny_decoder {reference!r} has no {DIFFUSERS_WEIGHTS} "
                                     "(only .safetensors weights are read)")
        return _from_file(weights, reference, config)
    for name in TAESD_FILES:
        if (folder / name).is_file():
            return _from_file(folder / name, reference, config=None)
    what = ("a full model folder (model_index.json)" if (folder / "model_index.json").is_file()
            else "a folder without config.json or taesd_decoder.safetensors")
    raise ModelNotFoundError(f"tiny_decoder {reference!r} is {what}; {VALID}")


def _folder_config(config_file: Path, reference: str) -> dict[str, Any]:
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"tiny_decoder {reference!r}: its config.json cannot be read: "
                                 f"{first_line(exc)}") from None
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != "AutoencoderTiny":
        raise ModelNotFoundError(f"tiny_decoder {reference!r} is a {kind or 'non-diffusers'} "
                                 f"folder (config.json), not an AutoencoderTiny; {VALID}")
    # AutoencoderTiny saves a copy of decoder_block_out_channels that it does not take back.
    config.pop("block_out_channels", None)
    return config


def _from_file(path: Path, reference: str, config: dict[str, Any] | None) -> TinyDecoder:
    """Read, recognise and load one weights file; `config`: its folder's, else TAESD's."""
    _refuse_sdxl(path.name, reference)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelNotFoundError(f"tiny_decoder {reference!r} cannot be read: "
                                 f"{exc.strerror or exc}") from None
    state = _read_state(data, path, reference)
    decoder_state = _decoder_state(state, reference)
    if config is None:
        config = json.loads((arch_dir("taesd") / "config.json").read_text())
        # TAESD for SD3 / FLUX (taesd3, taef1) is the same network on 16 latent channels.
        config["latent_channels"] = decoder_state[f"{DECODER_LAYERS}0.weight"].shape[1]
    model = _build(config, decoder_state, reference)
    # absolute(), not resolve(): a hub cache's files are links to blobs named by their hash
    return TinyDecoder(model, reference, path.absolute(), hashlib.sha256(data).hexdigest())


def _read_state(data: bytes, path: Path, reference: str) -> dict[str, Any]:
    import torch

    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load

        try:
            state = load(data)
        except Exception as exc:  # SafetensorError: a short file, a header that is not JSON
            raise ModelNotFoundError(f"tiny_decoder {reference!r} is not a readable "
                                     f".safetensors file (truncated or corrupt?): "
                                     f"{first_line(exc)}") from None
    else:
        state = load_tensor_pickle(data, f"tiny_decoder {reference!r}", ModelNotFoundError)
    if not isinstance(state, dict) or not state:
        raise ModelNotFoundError(f"tiny_decoder {reference!r} holds no weights; {VALID}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _decoder_state(state: dict[str, Any], reference: str) -> dict[str, Any]:
    """DecoderTiny's state dict from TAESD's layout or an AutoencoderTiny's; anything else is
    an error that says what the file is."""
    if any(k.startswith("decoder." + DECODER_LAYERS) for k in state):  # diffusers' layout
        return {k.removeprefix("decoder."): v for k, v in state.items()
                if k.startswith("decoder.")}
    first = state.get(f"{TAESD_INDEX_OFFSET}.weight")
    if (all(_INDEXED.match(k) for k in state) and "0.weight" not in state
            and first is not None and first.ndim == 4):
        return taesd_to_diffusers(state)
    raise ModelNotFoundError(f"tiny_decoder {reference!r} is {_what_it_is(state)}, not a tiny "
                             f"decoder; {VALID}")


def _what_it_is(state: dict[str, Any]) -> str:
    """A file that is not a tiny decoder, named by its keys."""
    keys = list(state)

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if any("lora" in k.lower() for k in keys):
        return "a LoRA file"
    if has("model.diffusion_model.", "conditioner.", "cond_stage_model."):
        return "a full Stable Diffusion checkpoint"
    if has("decoder.up", "decoder.mid", "encoder.down", "first_stage_model.", "post_quant_conv."):
        return "a full VAE (AutoencoderKL)"
    if has("down_blocks.", "time_embedding.", "conv_in.", "unet."):
        return "a UNet"
    if has("encoder.layers.") or ("0.weight" in state and state["0.weight"].ndim == 4
                                  and state["0.weight"].shape[1] == 3):
        return "a TAESD encoder (it reads images; give taesd_decoder, not taesd_encoder)"
    if has("string_to_param", "emb_params"):
        return "a textual-inversion embedding"
    return f"not a TAESD decoder (keys such as {keys[0]!r})"


def _build(config: dict[str, Any], decoder_state: dict[str, Any], reference: str):
    """AutoencoderTiny from `config` with these decoder weights; a state dict that does not fit
    its decoder exactly (missing, extra or misshapen tensors) is an error."""
    import torch
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):  # initial weights are all replaced: leave the RNG
        model = AutoencoderTiny.from_config(config)
    expected = model.decoder.state_dict()
    problem = next((f"no {k}" for k in expected if k not in decoder_state), None) or next(
        (f"an extra {k}" for k in decoder_state if k not in expected), None) or next(
        (f"{k} is {tuple(v.shape)}, TAESD's is {tuple(expected[k].shape)}"
         for k, v in decoder_state.items() if v.shape != expected[k].shape), None)
    if problem:
        raise ModelNotFoundError(f"tiny_decoder {reference!r} does not fit TAESD's decoder "
                                 f"({problem}); {VALID}")
    model.decoder.load_state_dict({k: v.float() for k, v in decoder_state.items()})
    # The encoder kept its random initial weights: drop it rather than keep a wrong one.
    model.encoder = None
    return model.eval()
