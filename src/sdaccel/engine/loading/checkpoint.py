"""Single-file checkpoints in the original layout (LDM for SD 1.5, SGM for SDXL): read, check,
convert, write, hash.

Reading is safe: `.safetensors` holds tensors only, and a `.ckpt` (a pickle) is read with
`torch.load(weights_only=True)`, which refuses any pickle that names a callable; such a file is
refused before anything in it runs. The architecture is recognised from the keys and shapes
(`recognise`): SD 1.5 and SDXL base load, anything else is one line saying what it is.
Conversion is diffusers' own (`from_single_file` of each component, `config=` a local diffusers
folder: SD 1.5's or SDXL's configs shipped in the package, so nothing is fetched). Writing is
the inverse of that conversion (`ldm_state_dict`, `save_checkpoint`): a model of ours as one
original-layout file, checked against diffusers' conversion before it is written, so every file
written here loads back to the same weights.

Key layout (prefixes):  model.diffusion_model.*        the UNet (input_blocks, middle_block, ...;
                                                       SDXL's added conditioning is label_emb.*)
                        first_stage_model.*            the VAE (encoder.down.N.block.M, ...)
                        cond_stage_model.transformer.* SD 1.5's CLIP text encoder (text_model.*)
                        conditioner.embedders.0.transformer.*   SDXL's CLIP ViT-L (text_model.*)
                        conditioner.embedders.1.model.*         SDXL's OpenCLIP ViT-bigG
                                                       (resblocks.N.attn.in_proj_*, ...)
SD 2.x has `cond_stage_model.model.*` (OpenCLIP) and 1024-dim cross-attention; the SDXL refiner
has only `conditioner.embedders.0.model.*` (bigG).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickletools
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

from sdaccel.cache_dir import cache_root
from sdaccel.errors import ModelNotFoundError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL's CLIP ViT-L (text_model.*)
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's OpenCLIP ViT-bigG
REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."  # the refiner's only encoder
BASE_KEY = "sdaccel.base"  # metadata: the configs a model not of a released size needs
SUFFIXES = (".safetensors", ".ckpt")

# Keys and shapes that tell SD 1.5 from the rest (diffusers' CHECKPOINT_KEY_NAMES, plus ours).
SD15_SHAPES = {
    UNET_PREFIX + "input_blocks.0.0.weight": (320, 4, 3, 3),
    UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    UNET_PREFIX + "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
    CLIP_PREFIX + "text_model.embeddings.token_embedding.weight": (49408, 768),
    VAE_PREFIX + "encoder.conv_in.weight": (128, 3, 3, 3),
}
# ... and SDXL 1.0 base (and its fine-tunes: Pony, Illustrious, NoobAI, Turbo, Lightning).
SDXL_SHAPES = {
    UNET_PREFIX + "input_blocks.0.0.weight": (320, 4, 3, 3),
    UNET_PREFIX + "label_emb.0.0.weight": (1280, 2816),
    UNET_PREFIX + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
    UNET_PREFIX + "middle_block.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
    SDXL_CLIP_PREFIX + "text_model.embeddings.token_embedding.weight": (49408, 768),
    SDXL_OPENCLIP_PREFIX + "token_embedding.weight": (49408, 1280),
    SDXL_OPENCLIP_PREFIX + "transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    VAE_PREFIX + "encoder.conv_in.weight": (128, 3, 3, 3),
}
SUPPORTED = "only Stable Diffusion 1.5 and SDXL (base) single-file checkpoints load"


# --------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path, ref: str | None = None) -> tuple[dict[str, Any], dict]:
    """(state dict, metadata) of a `.safetensors` or `.ckpt` file; every failure is one
    ModelNotFoundError naming the file (`ref`: the name the user gave)."""
    import torch

    path = Path(path)
    ref = ref or str(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                # EMA copies beside the weights go unused (diffusers loads the plain ones): not
                # read, which saves their memory (2 GB in SD 1.5's full file).
                state = {key: handle.get_tensor(key) for key in handle.keys()  # noqa: SIM118
                         if not key.startswith("model_ema.")}
        except OSError as exc:
            raise ModelNotFoundError(f"model {ref!r} cannot be read: {exc.strerror or exc}") \
                from exc
        except Exception as exc:  # safetensors' SafetensorError: a bad header or short file
            raise ModelNotFoundError(_corrupt(ref, exc)) from exc
        return state, metadata
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4": not the user's concern
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            loaded = torch.load(path, map_location="cpu", weights_only=True,
                                mmap=zipfile.is_zipfile(path))
    except OSError as exc:
        raise ModelNotFoundError(f"model {ref!r} cannot be read: {exc.strerror or exc}") from exc
    except Exception as exc:  # UnpicklingError (refused or garbled), RuntimeError (bad zip), ...
        code = _refused_globals(str(exc)) or _unsafe_globals(path)
        if code:
            raise ModelNotFoundError(
                f"model {ref!r} refused: its pickle would run code ({', '.join(code[:3])}); "
                ".ckpt files are only read weights-only (torch.load(weights_only=True)), "
                "so nothing in it ran; use a .safetensors copy from a source you trust"
            ) from exc
        raise ModelNotFoundError(_corrupt(ref, exc)) from exc
    metadata: dict[str, Any] = {}
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        if isinstance(loaded.get(BASE_KEY), str):
            metadata[BASE_KEY] = loaded[BASE_KEY]
        loaded = loaded["state_dict"]  # Lightning-style {"state_dict": ...}, as diffusers
    if not isinstance(loaded, dict):
        raise ModelNotFoundError(f"model {ref!r} is not a checkpoint: it holds a "
                                 f"{type(loaded).__name__}, not a dict of weights")
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}, metadata


def _corrupt(ref: str, exc: Exception) -> str:
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"model {ref!r} is truncated or corrupt (not a readable checkpoint): {detail}"


def _refused_globals(message: str) -> list[str]:
    """The callable torch's weights-only unpickler refused, named in its error message."""
    return re.findall(r"GLOBAL ([\w.]+)", message)


_PLAIN_GLOBALS = re.compile(r"^(torch\.|collections\.OrderedDict$|_codecs\.encode$|"
                            r"builtins\.(set|frozenset|bytearray|complex|slice)$)")


def _unsafe_globals(path: Path) -> list[str]:
    """Callables a pickle names beyond torch's tensor rebuilding, read from its opcodes with
    pickletools (which parses and runs nothing)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                data = archive.read(names[0]) if names else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile, KeyError):
        return []
    if not data.startswith(b"\x80"):  # not a pickle (protocol 2+): a damaged file, not code
        return []
    found, strings = [], []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:  # a garbled pickle: what was read so far is what it named
        pass
    return [name for name in dict.fromkeys(found) if not _PLAIN_GLOBALS.match(name)]


# --------------------------------------------------------------------------- architecture

# Families this project does not run, by a key only they have (with or without the UNet prefix).
OTHER_FAMILIES = (
    ("joint_blocks.", "an SD 3 / 3.5 checkpoint (MMDiT joint_blocks.*)"),
    ("double_blocks.", "a Flux checkpoint (double_blocks.*)"),
    ("edm_mean", "a Playground v2.5 checkpoint (edm_mean: EDM on SDXL's layout)"),
    ("clip_txt_mapper.", "a Stable Cascade checkpoint (clip_txt_mapper.*)"),
)


def recognise(state: dict[str, Any], sizes: bool = True) -> tuple[str | None, str | None]:
    """What an original-layout state dict is, from its keys and shapes: ("sd15", None) or
    ("sdxl", None) for what loads (the shipped configs' name), else (None, what it is).
    `sizes=False`: the family's layout only, not its released sizes (a file written here from
    a small model of that family)."""
    for marker, what in OTHER_FAMILIES:
        if any(k.startswith((marker, UNET_PREFIX + marker)) for k in state):
            return None, what
    sdxl = any(k.startswith("conditioner.embedders.") for k in state)
    problem = _sdxl_encoders_problem(state) if sdxl else _sd_encoders_problem(state)
    if problem:
        return None, problem
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.ndim == 4 and conv_in.shape[1] != 4:
        kind = {9: "inpainting", 8: "instruct-pix2pix"}.get(conv_in.shape[1])
        kind = " ".join(filter(None, ["SDXL" if sdxl else None, kind, "checkpoint"]))
        return None, (f"{'an' if kind[0] in 'iS' else 'a'} {kind} ({conv_in.shape[1]} UNet "
                      "input channels; text-to-image has 4)")
    if not any(k.startswith(VAE_PREFIX) for k in state):
        return None, "a UNet without its VAE (no first_stage_model.* keys)"
    if not sizes:
        return ("sdxl" if sdxl else "sd15"), None
    attn2 = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if not sdxl and attn2 in state and state[attn2].shape[-1] != 768:
        return None, f"not SD 1.5 ({state[attn2].shape[-1]}-dim cross-attention; SD 1.5 has 768)"
    name, shapes = ("SDXL base", SDXL_SHAPES) if sdxl else ("SD 1.5", SD15_SHAPES)
    for key, shape in shapes.items():
        if key not in state:
            return None, f"not {name} (no {key})"
        if tuple(state[key].shape) != shape:
            return None, (f"not {name} ({key} is {tuple(state[key].shape)}, {name}'s is "
                          f"{shape})")
    return ("sdxl" if sdxl else "sd15"), None


def _sd_encoders_problem(state: dict[str, Any]) -> str | None:
    """What a file without SDXL's embedders is, when not SD 1.5's layout."""
    v2_key = UNET_PREFIX + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
    if (any(k.startswith("cond_stage_model.model.") for k in state)
            or (v2_key in state and state[v2_key].shape[-1] == 1024)):
        return ("an SD 2.x checkpoint (OpenCLIP text encoder cond_stage_model.model.*, "
                "1024-dim cross-attention)")
    if not any(k.startswith(UNET_PREFIX) for k in state):
        if any("lora_" in k or ".lora." in k for k in state):
            sdxl = any(k.startswith(("lora_te2_", "lora_te1_")) or "text_encoder_2." in k
                       for k in state)
            return (f"a{'n SDXL' if sdxl else ''} LoRA file, not a full checkpoint (load it "
                    "with --lora)")
        if any(k.startswith(("down_blocks.", "unet.", "mid_block.")) for k in state):
            return ("a diffusers-format state dict, not the original layout "
                    "(no model.diffusion_model.*)")
        return "not a Stable Diffusion checkpoint (no UNet weights model.diffusion_model.*)"
    if (any(k.startswith(VAE_PREFIX) for k in state)
            and not any(k.startswith(CLIP_PREFIX) for k in state)):
        return "a checkpoint without its CLIP text encoder (no cond_stage_model.transformer.*)"
    return None


def _sdxl_encoders_problem(state: dict[str, Any]) -> str | None:
    """What a file with SDXL's embedders (conditioner.embedders.N.*) is, when not SDXL base:
    base has CLIP ViT-L (0.transformer.*) and OpenCLIP ViT-bigG (1.model.*), the refiner only
    bigG (0.model.*)."""
    has = {p: any(k.startswith(p) for k in state)
           for p in (SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX, REFINER_OPENCLIP_PREFIX)}
    if has[REFINER_OPENCLIP_PREFIX] and not has[SDXL_CLIP_PREFIX]:
        return ("an SDXL refiner checkpoint (one text encoder, OpenCLIP ViT-bigG "
                f"{REFINER_OPENCLIP_PREFIX}*), which is not supported")
    if not any(k.startswith(UNET_PREFIX) for k in state):
        return "SDXL text encoders without a UNet (no model.diffusion_model.*)"
    missing = [p for p in (SDXL_CLIP_PREFIX, SDXL_OPENCLIP_PREFIX) if not has[p]]
    if missing:
        return (f"an SDXL-layout checkpoint without both text encoders (no {missing[0]}*; "
                f"SDXL base has CLIP ViT-L {SDXL_CLIP_PREFIX}* and OpenCLIP ViT-bigG "
                f"{SDXL_OPENCLIP_PREFIX}*)")
    return None


def architecture_problem(state: dict[str, Any]) -> str | None:
    """None for an SD 1.5 or SDXL base text-to-image checkpoint, else what it is, in words."""
    return recognise(state)[1]


def schedule_markers(state: dict[str, Any]) -> dict[str, Any]:
    """Scheduler settings a file's marker keys ask for, read as ComfyUI and Forge read them:
    `v_pred` (a v-prediction model, e.g. NoobAI-XL V-Pred) and `ztsnr` (trained with zero
    terminal SNR); {} for the usual epsilon-prediction file."""
    markers: dict[str, Any] = {}
    if "v_pred" in state:
        markers["prediction_type"] = "v_prediction"
    if "ztsnr" in state:
        markers["rescale_betas_zero_snr"] = True
    return markers


def check_architecture(state: dict[str, Any], ref: str, sizes: bool = True) -> str:
    """The shipped configs (`archs/` name: "sd15", "sdxl") an original-layout file converts
    with, or one ModelNotFoundError naming the file and what it is (`sizes`: as `recognise`)."""
    arch, problem = recognise(state, sizes)
    if arch is None:
        raise ModelNotFoundError(f"model {ref!r} is {problem}; {SUPPORTED}")
    return arch


# --------------------------------------------------------------------------- converting

PART_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder",
              "text_encoder_2": "second text encoder (OpenCLIP ViT-bigG)"}


def convert_components(state: dict[str, Any], config_dir: str | Path, ref: str,
                       dtypes: dict[str, Any] | None = None) -> dict[str, Any]:
    """{part: model} from an original-layout state dict, by diffusers' own single-file
    conversion with the diffusers configs in `config_dir` (a local folder with unet/, vae/,
    text_encoder/ and, for SDXL, text_encoder_2/ configs: nothing is fetched); each part in the
    torch dtype `dtypes` gives it ("unet", "vae", "text_encoder"; the second text encoder takes
    the first's), else fp32. SDXL's text encoders are each handed only their own embedder's keys,
    so diffusers' conversion cannot take one for the other (it tells them apart by width, which
    a small model can share)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = str(config_dir)
    dtypes = dtypes or {}
    sdxl = (Path(config_dir) / "text_encoder_2").is_dir()

    def common(part: str) -> dict[str, Any]:
        dtype = dtypes.get(part, dtypes.get("text_encoder") if part == "text_encoder_2" else None)
        return {"subfolder": part, "config": config, "local_files_only": True,
                "torch_dtype": dtype or torch.float32}

    def only(prefix: str) -> dict[str, Any]:
        return {k: v for k, v in state.items() if k.startswith(prefix)}

    loaders = {
        "unet": lambda: UNet2DConditionModel.from_single_file(state, **common("unet")),
        "vae": lambda: AutoencoderKL.from_single_file(state, **common("vae")),
        "text_encoder": lambda: create_diffusers_clip_model_from_ldm(
            CLIPTextModel, only(SDXL_CLIP_PREFIX) if sdxl else state, **common("text_encoder")),
    }
    if sdxl:
        loaders["text_encoder_2"] = lambda: create_diffusers_clip_model_from_ldm(
            CLIPTextModelWithProjection, _bare_projection(only(SDXL_OPENCLIP_PREFIX)),
            **common("text_encoder_2"))
    parts = {}
    for part, load in loaders.items():
        what = PART_NAMES[part]
        try:
            model = load()
        except Exception as exc:  # shape mismatches (ValueError), missing parts (diffusers' own)
            raise ModelNotFoundError(f"model {ref!r}: its {what} does not convert: "
                                     f"{first_line(exc)}") from exc
        missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if missing:
            raise ModelNotFoundError(
                f"model {ref!r}: its {what} lacks {len(missing)} weights (e.g. {missing[0]}); "
                "the file is incomplete or not of this architecture")
        parts[part] = model.eval()
    return parts


def _bare_projection(state: dict[str, Any]) -> dict[str, Any]:
    """OpenCLIP keeps bigG's projection as a bare matrix (`text_projection`, x @ P); some
    tools save it as a linear layer's `text_projection.weight` (P transposed), which diffusers'
    conversion does not read. Read both, as ComfyUI does."""
    linear = SDXL_OPENCLIP_PREFIX + "text_projection.weight"
    if linear not in state or linear[:-len(".weight")] in state:
        return state
    state = dict(state)
    state[linear[:-len(".weight")]] = state.pop(linear).T
    return state


# --------------------------------------------------------------------------- writing

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}


def _unet_key(key: str, config: dict[str, Any]) -> str:
    """A diffusers UNet2DConditionModel key -> its LDM key (without the prefix)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if config.get("addition_embed_type") == "text_time":  # SDXL's added conditioning
        top = {**top, **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    if key in top:
        return top[key]
    per_block = config["layers_per_block"] + 1
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        side, block, kind, layer, rest = m.groups()
        index = int(block) * per_block + int(layer) + (1 if side == "down" else 0)
        blocks = "input_blocks" if side == "down" else "output_blocks"
        if kind == "resnets":
            name, _, tail = rest.partition(".")
            return f"{blocks}.{index}.0.{_UNET_RESNET.get(name, name)}.{tail}"
        return f"{blocks}.{index}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        block, tail = m.groups()
        return f"input_blocks.{int(block) * per_block + per_block}.0.op.{tail}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block, tail = m.groups()
        index = int(block) * per_block + per_block - 1
        has_attention = config["up_block_types"][int(block)].startswith("CrossAttn")
        return f"output_blocks.{index}.{2 if has_attention else 1}.conv.{tail}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, layer, rest = m.groups()
        if kind == "attentions":
            return f"middle_block.{2 * int(layer) + 1}.{rest}"
        name, _, tail = rest.partition(".")
        return f"middle_block.{2 * int(layer)}.{_UNET_RESNET.get(name, name)}.{tail}"
    raise ValueError(f"UNet key {key!r} has no place in the LDM layout")


def _vae_key(key: str, config: dict[str, Any]) -> str:
    """A diffusers AutoencoderKL key -> its LDM key (without the prefix)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in top:
        return top[key]
    n_up = len(config["up_block_types"])
    if m := re.match(r"(encoder\.down|decoder\.up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        side, block, layer, rest = m.groups()
        block = int(block) if side == "encoder.down" else n_up - 1 - int(block)
        return f"{side}.{block}.block.{layer}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        rest = m[3].replace("conv_shortcut", "nin_shortcut")
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{rest}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION.get(m[2], m[2])}.{m[3]}"
    raise ValueError(f"VAE key {key!r} has no place in the LDM layout")


def _openclip_key(key: str) -> str:
    """A diffusers CLIPTextModelWithProjection key -> its OpenCLIP key (SDXL's bigG encoder,
    without the prefix); q/k/v projections -> `attn.in_proj_*` (which stacks them)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    if key in top:
        return top[key]
    if m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key):
        layer, rest = m.groups()
        if q := re.match(r"self_attn\.[qkv]_proj\.(weight|bias)$", rest):
            return f"transformer.resblocks.{layer}.attn.in_proj_{q[1]}"
        for ours, theirs in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
                             ("self_attn.", "attn.")):
            rest = rest.replace(ours, theirs)
        return f"transformer.resblocks.{layer}.{rest}"
    raise ValueError(f"text encoder key {key!r} has no place in the OpenCLIP layout")


def _openclip_state_dict(encoder) -> dict[str, Any]:
    """SDXL's second text encoder in the OpenCLIP layout (prefix included), as SDXL's released
    files have it: q, k, v stacked into in_proj, the projection stored transposed, logit_scale."""
    import math

    import torch

    out: dict[str, Any] = {}
    stacked: dict[str, list[Any]] = {}
    for key, value in encoder.state_dict().items():
        ldm_key = SDXL_OPENCLIP_PREFIX + _openclip_key(key)
        if ".attn.in_proj_" in ldm_key:
            stacked.setdefault(ldm_key, []).append((key, value))
        else:
            out[ldm_key] = value.T if key == "text_projection.weight" else value
    for ldm_key, qkv in stacked.items():  # in q, k, v order, as OpenCLIP's attention has them
        order = [next(v for k, v in qkv if f".{p}_proj." in k) for p in "qkv"]
        out[ldm_key] = torch.cat(order)
    device = encoder.text_projection.weight.device
    out[SDXL_OPENCLIP_PREFIX + "logit_scale"] = torch.tensor(math.log(100.0), device=device)
    return out


def ldm_state_dict(unet, vae, text_encoder, text_encoder_2=None) -> dict[str, Any]:
    """The models' weights in the original layout, as one state dict: SD 1.5's (LDM), or with
    `text_encoder_2` SDXL's (SGM: conditioner.embedders.*). The inverse of diffusers'
    single-file conversion, checked against it (every tensor converts back to the one it came
    from)."""
    import torch

    sdxl = text_encoder_2 is not None
    ldm: dict[str, Any] = {}
    for key, value in unet.state_dict().items():
        ldm[UNET_PREFIX + _unet_key(key, unet.config)] = value
    for key, value in vae.state_dict().items():
        ldm_key = VAE_PREFIX + _vae_key(key, vae.config)
        if ".mid.attn_1." in ldm_key and value.ndim == 2:  # 1x1 convolutions in the LDM VAE
            value = value[:, :, None, None]
        ldm[ldm_key] = value
    clip = SDXL_CLIP_PREFIX if sdxl else CLIP_PREFIX
    for key, value in text_encoder.state_dict().items():
        ldm[clip + "text_model." + key.removeprefix("text_model.")] = value
    positions = text_encoder.config.max_position_embeddings  # as the released files carry them
    ldm[clip + "text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    if sdxl:
        ldm.update(_openclip_state_dict(text_encoder_2))
    _check_converts_back(ldm, unet, vae, text_encoder, text_encoder_2)
    return ldm


def _check_converts_back(ldm: dict[str, Any], unet, vae, text_encoder, text_encoder_2) -> None:
    """diffusers' conversion of `ldm` must give back every tensor of the models: the same
    storage where the layouts agree, equal values where ours stacks or transposes (bigG)."""
    import torch
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    def plain(sd: dict[str, Any]) -> dict[str, Any]:
        return {k.removeprefix("text_model."): v for k, v in sd.items()
                if not k.endswith("position_ids")}

    back = {
        "UNet": (convert_ldm_unet_checkpoint(ldm, unet.config), unet.state_dict()),
        "VAE": (convert_ldm_vae_checkpoint(ldm, vae.config), vae.state_dict()),
        "text encoder": (plain(convert_ldm_clip_checkpoint(ldm)),
                         plain(text_encoder.state_dict())),
    }
    if text_encoder_2 is not None:
        back["second text encoder"] = (
            convert_open_clip_checkpoint(text_encoder_2, ldm, prefix=SDXL_OPENCLIP_PREFIX),
            text_encoder_2.state_dict())

    def same(a, b) -> bool:
        if a.shape != b.shape:
            return False
        return a.data_ptr() == b.data_ptr() or (not a.is_meta and torch.equal(a, b))

    for what, (converted, original) in back.items():
        wrong = sorted(set(converted) ^ set(original)) or [
            k for k in original if not same(converted[k], original[k])]
        if wrong:
            raise ValueError(f"the {what} does not convert back through diffusers' single-file "
                             f"conversion ({len(wrong)} keys, e.g. {wrong[0]})")


def save_checkpoint(components, path: str | Path, dtype=None, base: str | None = None) -> Path:
    """Write `components` (.unet, .vae, .text_encoder, and SDXL's .text_encoder_2) as one
    original-layout checkpoint: `.safetensors`, or `.ckpt` (torch.save of {"state_dict": ...}).
    `dtype` casts the floating weights (torch.float16 for an fp16 file). `base` records which
    configs a model not of a released size loads with (bundled:NAME, random:tiny,
    random:sdxl-tiny); by default that of `components.name` when it is one of those, nothing for
    random:sd15 / random:sdxl (SD 1.5's and SDXL's sizes, recognised from the file)."""
    import torch

    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: a checkpoint is .safetensors or .ckpt")
    name = getattr(components, "name", "") or ""
    if (base is None and name.startswith(("bundled:", "random:"))
            and name not in ("random:sd15", "random:sdxl")):
        base = name
    state = ldm_state_dict(components.unet, components.vae, components.text_encoder,
                           getattr(components, "text_encoder_2", None))
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
             .detach().cpu().contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "pt", **({BASE_KEY: base} if base else {})})
    else:
        torch.save({"state_dict": state, **({BASE_KEY: base} if base else {})}, path)
    return path


# --------------------------------------------------------------------------- hashing


def file_sha256(path: str | Path) -> str:
    """sha256 of the file, remembered per (path, size, mtime) in <sdaccel cache>/hashes.json so
    a multi-GB checkpoint is hashed once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    store = cache_root() / "hashes.json"
    try:
        known = json.loads(store.read_text())
        if isinstance(known.get(key), str):
            return known[key]
    except (OSError, ValueError, AttributeError):
        known = {}
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    known = known if isinstance(known, dict) else {}
    known[key] = digest.hexdigest()
    try:  # remembering is a convenience: a cache that cannot be written changes nothing
        store.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=store.parent, delete=False,
                                         suffix=".tmp") as tmp:
            json.dump(known, tmp)
        os.replace(tmp.name, store)
    except OSError:
        pass
    return known[key]


def model_hash(path: str | Path) -> str:
    """AUTOMATIC1111's `Model hash` (its "AutoV2"): the file's sha256, first 10 hex digits."""
    return file_sha256(path)[:10]


def first_line(exc: BaseException) -> str:
    """An exception in one line: its message's first line, or its type."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_tensor_pickle(data: bytes, what: str, error: type[Exception]) -> Any:
    """torch.load(weights_only=True) of a small file's bytes (a LoRA, an embedding): a pickle
    that would run code, or a damaged one, is `error` naming `what` ("LoRA file 'x.pt'")."""
    import io
    import pickle

    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # Both of torch's wordings: "Unsupported global: GLOBAL x" and "... GLOBAL posix.system
        # whose module posix is blocked"
        wanted = _refused_globals(str(exc))
        if wanted:
            raise error(f"{what} holds more than tensors ({wanted[0]}): loading it would "
                        "run code from the file, which sdaccel never does (convert it to "
                        ".safetensors where you trust it)") from None
        raise error(f"{what} is not a readable PyTorch file (truncated or corrupt?): "
                    f"{first_line(exc)}") from None
    except Exception as exc:  # RuntimeError / EOFError from a damaged zip or pickle
        raise error(f"{what} is not a readable PyTorch file (truncated or corrupt?): "
                    f"{first_line(exc)}") from None
