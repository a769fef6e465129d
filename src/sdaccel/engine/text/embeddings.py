"""Textual-inversion embeddings: files -> new tokens of the tokenizer, with their vectors as new
rows of the text encoder's token embedding, through diffusers' `TextualInversionLoaderMixin`.

Files are read before the model loads (a missing or corrupt file fails fast) and added to the
model's tokenizer and text encoder after it loads, before they are cast. Formats:

- AUTOMATIC1111 `.pt` (`{"string_to_param": {"*": vectors}, "name": ...}`), read with
  `torch.load(weights_only=True)`: tensors only, a pickle that wants to run code is refused;
- AUTOMATIC1111 / civitai `.safetensors` (`{"emb_params": vectors}`);
- diffusers (`learned_embeds.safetensors` / `.bin`: `{token: vector}`), or a folder holding one;
- SDXL (`.safetensors` or `.pt` with `clip_l` and `clip_g` vectors, as A1111 and civitai ship
  them): the `clip_l` vectors go to SDXL's first text encoder (CLIP ViT-L), the `clip_g` ones to
  its second (OpenCLIP bigG), under the same token, as diffusers' documentation loads them.

An SD 1.x file on an SDXL model, and the reverse, is refused naming the file and both families.

The token a prompt uses is `token` when the settings give one, else the file's own token for
the diffusers format, else the file's stem, as A1111 names an embedding after its file. An
embedding of n vectors takes n tokens (`tok`, `tok_1`, ... as diffusers names them); a prompt
writes only `tok`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdaccel.engine.loading.checkpoint import first_line, load_tensor_pickle
from sdaccel.errors import ConfigError, ModelNotFoundError

SUFFIXES = (".pt", ".bin", ".safetensors")
DIFFUSERS_NAMES = ("learned_embeds.safetensors", "learned_embeds.bin")
A1111_SAFETENSORS_KEY = "emb_params"


@dataclass(frozen=True)
class EmbeddingFile:
    """One embedding file, read and checked, not yet added to a model."""

    path: Path  # absolute
    token: str
    sha256: str
    vectors: Any  # torch.Tensor (n, dim), fp32; an SDXL file's clip_l vectors
    vectors_g: Any = None  # an SDXL file's clip_g vectors (n, dim), fp32; None: an SD 1.x file

    @property
    def per_encoder(self) -> list[Any]:
        """Its vectors for each text encoder of the model family it is made for, in order."""
        return [self.vectors] if self.vectors_g is None else [self.vectors, self.vectors_g]

    def record(self) -> dict[str, str]:
        """Its settings entry, complete: what an image's metadata records."""
        return {"path": str(self.path), "token": self.token, "sha256": self.sha256}


@dataclass(frozen=True)
class LoadedEmbedding:
    file: EmbeddingFile
    # The ids of its vectors' tokens, in order, in each text encoder's tokenizer
    token_ids: tuple[tuple[int, ...], ...]


def read_embeddings(entries: Sequence[Any]) -> list[EmbeddingFile]:
    """Read every settings entry (`path`, optional `token`, optional `sha256`); the first bad
    file is an error naming it (exit 3); two with one token, a settings error."""
    files = [read_embedding(entry.path, entry.token, entry.sha256) for entry in entries]
    seen: dict[str, Path] = {}
    for file in files:
        key = file.token.lower()  # the CLIP tokenizer lower-cases what it reads
        if key in seen:
            raise ConfigError(
                f"embeddings: {str(seen[key])!r} and {str(file.path)!r} both use the token "
                f"{file.token!r}; give one of them another `token:` in the embeddings list")
        seen[key] = file.path
    return files


def read_embedding(path: str | Path, token: str | None = None,
                   sha256: str | None = None) -> EmbeddingFile:
    given = str(path)
    where = Path(path).expanduser()
    if where.is_dir():
        found = [where / name for name in DIFFUSERS_NAMES if (where / name).is_file()]
        if not found:
            raise ModelNotFoundError(f"embedding folder {given!r} holds no "
                                     f"{' or '.join(DIFFUSERS_NAMES)}")
        where = found[0]
    if not where.is_file():
        raise ModelNotFoundError(f"embedding file {given!r} does not exist")
    if where.suffix.lower() not in SUFFIXES:
        raise ModelNotFoundError(f"embedding file {given!r}: unknown kind of file; valid: "
                                 f"{', '.join(SUFFIXES)} or a diffusers folder")
    data = where.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and sha256.lower() != digest:
        raise ModelNotFoundError(
            f"embedding file {given!r} has sha256 {digest[:12]}…, the settings ask for "
            f"{sha256[:12]}… (not the file the settings were made with)")
    state = _load(data, where, given)
    own_token, vectors = _interpret(state, where, given)
    return EmbeddingFile(where.resolve(), token or own_token, digest, *vectors)


def _load(data: bytes, where: Path, given: str) -> Any:

    if where.suffix.lower() == ".safetensors":
        from safetensors.torch import load

        try:
            return load(data)
        except Exception as exc:  # SafetensorError, or a header that is not JSON
            raise ModelNotFoundError(f"embedding file {given!r} is not a readable .safetensors "
                                     f"file (truncated or corrupt?): {first_line(exc)}") from None
    return load_tensor_pickle(data, f"embedding file {given!r}", ModelNotFoundError)


def _interpret(state: Any, where: Path, given: str) -> tuple[str, tuple[Any, ...]]:
    """(its own token, its vectors (n, dim): one set, or SDXL's clip_l and clip_g sets) from
    any of the known layouts."""
    import torch

    stem = where.stem
    if isinstance(state, torch.Tensor):
        token, found = stem, [state]
    elif not isinstance(state, dict):
        raise ModelNotFoundError(f"embedding file {given!r} holds a {type(state).__name__}, "
                                 "not a textual-inversion embedding")
    elif "string_to_param" in state:  # A1111
        params = state["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ModelNotFoundError(f"embedding file {given!r}: string_to_param must hold one "
                                     "tensor")
        token, found = stem, [next(iter(params.values()))]
    elif {"clip_l", "clip_g"} <= set(state):  # SDXL, as A1111 reads it
        token, found = stem, [state["clip_l"], state["clip_g"]]
    elif len(state) == 1:
        key, vectors = next(iter(state.items()))
        token = stem if key == A1111_SAFETENSORS_KEY else key  # diffusers: {token: vector}
        found = [vectors]
    else:
        keys = ", ".join(sorted(map(str, state))[:6])
        raise ModelNotFoundError(f"embedding file {given!r} is not a textual-inversion "
                                 f"embedding (its keys: {keys})")
    if not all(isinstance(v, torch.Tensor) and v.dim() in (1, 2) and len(v) for v in found):
        raise ModelNotFoundError(f"embedding file {given!r}: the embedding is not a vector or "
                                 "a list of vectors")
    found = [v.detach().float().reshape(-1, v.shape[-1]) for v in found]
    if len({len(v) for v in found}) > 1:
        raise ModelNotFoundError(f"embedding file {given!r}: its clip_l and clip_g parts hold "
                                 f"{len(found[0])} and {len(found[1])} vectors (they must "
                                 "hold as many)")
    return token, tuple(found)


def family_mismatch(file: EmbeddingFile, encoders: int) -> str | None:
    """Why `file` does not fit a model of `encoders` text encoders (1: SD 1.x, 2: SDXL); None
    when it does."""
    if len(file.per_encoder) == encoders:
        return None
    if encoders == 1:
        return "is an SDXL embedding (clip_l and clip_g vectors); this model is SD 1.x"
    return (f"is an SD 1.x embedding (one set of {file.vectors.shape[-1]}-value vectors); this "
            "model is SDXL, whose embeddings hold clip_l and clip_g vectors")


def fits(file: EmbeddingFile, encoders: Sequence[Any]) -> bool:
    """Whether a model with these text encoders (in order) takes `file`."""
    return family_mismatch(file, len(encoders)) is None and all(
        vectors.shape[-1] == _width(encoder)
        for vectors, encoder in zip(file.per_encoder, encoders, strict=True))


def _width(text_encoder) -> int:
    return text_encoder.get_input_embeddings().weight.shape[-1]


def add_embeddings(files: Sequence[EmbeddingFile], encoders: Sequence[tuple[Any, Any]],
                   model: str) -> list[LoadedEmbedding]:
    """Add each file's token(s) and vectors to each (tokenizer, text encoder) of the model, in
    place (SDXL: the clip_l vectors to the first, the clip_g ones to the second)."""
    if not files:
        return []
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    for file in files:
        where = str(file.path)
        mismatch = family_mismatch(file, len(encoders))
        if mismatch:
            raise ModelNotFoundError(f"embedding file {where!r} {mismatch}")
        for vectors, (tokenizer, text_encoder) in zip(file.per_encoder, encoders, strict=True):
            if vectors.shape[-1] != _width(text_encoder):
                raise ModelNotFoundError(
                    f"embedding file {where!r} has vectors of {vectors.shape[-1]} values; the "
                    f"text encoder of {model!r} takes {_width(text_encoder)} (an embedding for "
                    "another model: SD 1.x has 768, SD 2.x 1024, SDXL 768 and 1280)")
            if file.token in tokenizer.get_vocab():
                raise ConfigError(
                    f"embedding file {where!r}: its token {file.token!r} is already in the "
                    f"tokenizer of {model!r}; give it another `token:` in the embeddings list")

    class Target(TextualInversionLoaderMixin):  # the minimal object the loader works on
        hf_device_map = None
        components: dict[str, Any] = {}

    for index, (tokenizer, text_encoder) in enumerate(encoders):
        Target().load_textual_inversion([f.per_encoder[index] for f in files],
                                        token=[f.token for f in files],
                                        tokenizer=tokenizer, text_encoder=text_encoder)
    loaded = []
    for file in files:
        names = [file.token, *(f"{file.token}_{i}" for i in range(1, len(file.vectors)))]
        loaded.append(LoadedEmbedding(file, tuple(
            tuple(tokenizer.convert_tokens_to_ids(names)) for tokenizer, _ in encoders)))
    return loaded


def expansions(loaded: Sequence[LoadedEmbedding], encoder: int = 0) -> dict[int, list[int]]:
    """A multi-vector embedding's first token id -> all its ids (what a prompt's token means),
    in the tokenizer of text encoder number `encoder`."""
    return {e.token_ids[encoder][0]: list(e.token_ids[encoder])
            for e in loaded if len(e.token_ids[encoder]) > 1}
