"""Textual-inversion embeddings: files -> new tokens of the tokenizer, with their vectors as new
rows of the text encoder's token embedding, through diffusers' `TextualInversionLoaderMixin`.

Files are read before the model loads (a missing or corrupt file fails fast) and added to the
model's tokenizer and text encoder after it loads, before they are cast. Formats:

- AUTOMATIC1111 `.pt` (`{"string_to_param": {"*": vectors}, "name": ...}`), read with
  `torch.load(weights_only=True)`: tensors only, a pickle that wants to run code is refused;
- AUTOMATIC1111 / civitai `.safetensors` (`{"emb_params": vectors}`);
- diffusers (`learned_embeds.safetensors` / `.bin`: `{token: vector}`), or a folder holding one.

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
    vectors: Any  # torch.Tensor (n, dim), fp32

    def record(self) -> dict[str, str]:
        """Its settings entry, complete: what an image's metadata records."""
        return {"path": str(self.path), "token": self.token, "sha256": self.sha256}


@dataclass(frozen=True)
class LoadedEmbedding:
    file: EmbeddingFile
    token_ids: tuple[int, ...]  # the ids of its vectors' tokens, in order


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
    return EmbeddingFile(where.resolve(), token or own_token, digest, vectors)


def _load(data: bytes, where: Path, given: str) -> Any:

    if where.suffix.lower() == ".safetensors":
        from safetensors.torch import load

        try:
            return load(data)
        except Exception as exc:  # SafetensorError, or a header that is not JSON
            raise ModelNotFoundError(f"embedding file {given!r} is not a readable .safetensors "
                                     f"file (truncated or corrupt?): {first_line(exc)}") from None
    return load_tensor_pickle(data, f"embedding file {given!r}", ModelNotFoundError)


def _interpret(state: Any, where: Path, given: str) -> tuple[str, Any]:
    """(its own token, its vectors (n, dim)) from any of the known layouts."""
    import torch

    stem = where.stem
    if isinstance(state, torch.Tensor):
        token, vectors = stem, state
    elif not isinstance(state, dict):
        raise ModelNotFoundError(f"embedding file {given!r} holds a {type(state).__name__}, "
                                 "not a textual-inversion embedding")
    elif "string_to_param" in state:  # A1111
        params = state["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ModelNotFoundError(f"embedding file {given!r}: string_to_param must hold one "
                                     "tensor")
        token, vectors = stem, next(iter(params.values()))
    elif {"clip_l", "clip_g"} <= set(state):
        raise ModelNotFoundError(f"embedding file {given!r} is an SDXL embedding (clip_l and "
                                 "clip_g vectors); this model is SD 1.x")
    elif len(state) == 1:
        key, vectors = next(iter(state.items()))
        token = stem if key == A1111_SAFETENSORS_KEY else key  # diffusers: {token: vector}
    else:
        keys = ", ".join(sorted(map(str, state))[:6])
        raise ModelNotFoundError(f"embedding file {given!r} is not a textual-inversion "
                                 f"embedding (its keys: {keys})")
    if not isinstance(vectors, torch.Tensor) or vectors.dim() not in (1, 2) or not len(vectors):
        raise ModelNotFoundError(f"embedding file {given!r}: the embedding is not a vector or "
                                 "a list of vectors")
    return token, vectors.detach().float().reshape(-1, vectors.shape[-1])


def add_embeddings(files: Sequence[EmbeddingFile], tokenizer, text_encoder,
                   model: str) -> list[LoadedEmbedding]:
    """Add each file's token(s) to `tokenizer` and vectors to `text_encoder` (in place)."""
    if not files:
        return []
    from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin

    width = text_encoder.get_input_embeddings().weight.shape[-1]
    vocabulary = tokenizer.get_vocab()
    for file in files:
        if file.vectors.shape[-1] != width:
            raise ModelNotFoundError(
                f"embedding file {str(file.path)!r} has vectors of {file.vectors.shape[-1]} "
                f"values; the text encoder of {model!r} takes {width} (an embedding for "
                "another model: SD 1.x has 768, SD 2.x 1024)")
        if file.token in vocabulary:
            raise ConfigError(
                f"embedding file {str(file.path)!r}: its token {file.token!r} is already in "
                f"the tokenizer of {model!r}; give it another `token:` in the embeddings list")

    class Target(TextualInversionLoaderMixin):  # the minimal object the loader works on
        hf_device_map = None
        components: dict[str, Any] = {}

    Target().load_textual_inversion([f.vectors for f in files], token=[f.token for f in files],
                                    tokenizer=tokenizer, text_encoder=text_encoder)
    loaded = []
    for file in files:
        names = [file.token, *(f"{file.token}_{i}" for i in range(1, len(file.vectors)))]
        ids = tuple(tokenizer.convert_tokens_to_ids(names))
        loaded.append(LoadedEmbedding(file, ids))
    return loaded


def expansions(loaded: Sequence[LoadedEmbedding]) -> dict[int, list[int]]:
    """A multi-vector embedding's first token id -> all its ids (what a prompt's token means)."""
    return {e.token_ids[0]: list(e.token_ids) for e in loaded if len(e.token_ids) > 1}


