"""A models folder laid out as AUTOMATIC1111 lays it out (`serve --models-dir DIR`): checkpoints,
LoRAs and embeddings listed in A1111's shapes and looked up by the names its clients send.

    DIR/checkpoints/ or DIR/Stable-diffusion/   .safetensors, .ckpt, diffusers model folders
    DIR/loras/ or DIR/Lora/                     .safetensors, .pt
    DIR/embeddings/                             .pt, .safetensors, .bin

Only what lies directly in those folders counts (not subfolders); a missing folder lists
nothing. The folders are read on every call, so a file copied in shows up without a restart.

A name from a request is only ever a key into a listing, never a path: a name with `/` or `\\`,
`..`, an absolute one or an empty one is refused before the disk is touched, and a symbolic
link that leads out of its folder is neither listed nor found. No request reads a file outside
the folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from math import isfinite
from pathlib import Path, PureWindowsPath
from typing import Any

from sdaccel.engine.loading.checkpoint import SUFFIXES as CHECKPOINT_SUFFIXES
from sdaccel.engine.loading.checkpoint import file_sha256
from sdaccel.engine.lora.tags import LORA_TAG
from sdaccel.engine.text.embeddings import SUFFIXES as EMBEDDING_SUFFIXES
from sdaccel.engine.text.embeddings import read_embedding
from sdaccel.errors import ConfigError
from sdaccel.settings import LoraEntry

CHECKPOINT_FOLDERS = ("checkpoints", "Stable-diffusion")
LORA_FOLDERS = ("loras", "Lora")
EMBEDDING_FOLDERS = ("embeddings",)
LORA_SUFFIXES = (".safetensors", ".pt")
MODEL_INDEX = "model_index.json"  # what makes a folder in checkpoints/ a diffusers model
EMBEDDING_READ_LIMIT = 16 << 20  # an embedding is KBs; a bigger file is listed, not read
HEADER_LIMIT = 16 << 20  # a LoRA's safetensors header past this: no metadata listed
TITLE = re.compile(r"(?P<file>.+) \[[0-9a-fA-F]{8,64}\]")  # "name.safetensors [0123456789]"
NO_FOLDER = "this server has no models folder to look LoRAs up in (start it with " \
            "`sdaccel serve --models-dir DIR`)"


class NameNotFound(ValueError):
    """A checkpoint, LoRA or embedding name that is not in the folder, or that is refused."""

    def __init__(self, kind: str, name: str, valid: Iterable[str], reason: str | None = None):
        self.kind, self.name, self.valid, self.reason = kind, name, list(valid), reason
        if reason:
            message = f"{kind} name {name!r} refused: {reason}"
        else:
            message = f"unknown {kind} {name!r}; valid: {', '.join(self.valid) or '(none)'}"
        super().__init__(message)


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint as A1111's /sdapi/v1/sd-models lists it. A diffusers folder has no hash
    (sha256 and hash None, title its name), as A1111 lists a file it has not hashed yet."""

    title: str  # "name.safetensors [hash]": what options' sd_model_checkpoint holds
    model_name: str  # the file's stem
    filename: str  # absolute path
    sha256: str | None
    hash: str | None  # A1111's short hash ("AutoV2"): the first 10 hex digits of sha256


def refusal(name: Any) -> str | None:
    """Why `name` cannot be a name in a folder (None: it can), from the text alone."""
    if not isinstance(name, str) or not name.strip():
        return "empty"
    if "/" in name or "\\" in name:
        return "a name is a file's name, not a path (no / or \\)"
    if ".." in name:
        return "'..' is not allowed in a name"
    if "\0" in name or PureWindowsPath(name).drive or Path(name).is_absolute():
        return "a name is a file's name, not an absolute path"
    return None


class ModelsDir:
    """The models folder at `root` (ConfigError, key "models_dir", when it is not a folder).
    Thread-safe for reading: it keeps only a memo of results
    per (file, size, modification time)."""

    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise ConfigError(f"models folder {str(root)!r} is not a folder", key="models_dir")
        self._memo: dict[tuple, Any] = {}

    # ------------------------------------------------------------------ checkpoints

    def checkpoints(self) -> list[Checkpoint]:
        """Every checkpoint, sorted by name (hashing each file once: the sha256 is kept in
        sdaccel's cache, so a multi-GB file is read the first time it is listed only)."""
        return [self._checkpoint(path) for path in self._scan("checkpoint")[0].values()]

    def checkpoint(self, name: str) -> Checkpoint:
        """By title ("name.safetensors [hash]"; the hash part is not checked), file name,
        model name (stem), or hash (10 or 64 hex digits)."""
        entries = self._entries("checkpoint", name)
        title = TITLE.fullmatch(name)
        candidates = [name, title["file"] if title else None]
        candidates += [key for key, path in entries.items() if _stem(path) == name]
        for key in candidates:
            if key in entries:
                return self._checkpoint(entries[key])
        if re.fullmatch(r"[0-9a-fA-F]{10}|[0-9a-fA-F]{64}", name):
            for checkpoint in self.checkpoints():
                if name.lower() in (checkpoint.hash, checkpoint.sha256):
                    return checkpoint
        raise self._unknown("checkpoint", name)

    def _checkpoint(self, path: Path) -> Checkpoint:
        if path.is_dir():
            return Checkpoint(path.name, path.name, str(path), None, None)
        sha256 = self._remember("sha256", path, file_sha256)
        return Checkpoint(f"{path.name} [{sha256[:10]}]", path.stem, str(path), sha256,
                          sha256[:10])

    # ------------------------------------------------------------------ LoRAs

    def loras(self) -> list[dict[str, Any]]:
        """A1111's /sdapi/v1/loras: name (the stem, what `<lora:name:w>` uses), alias (the
        file's `ss_output_name`, else the name), path, metadata (its safetensors header's
        fields, JSON ones decoded as A1111 does; {} for a .pt)."""
        listed = []
        for path in self._scan("lora")[0].values():
            metadata = self._remember("metadata", path, _safetensors_metadata)
            alias = metadata.get("ss_output_name")
            listed.append({"name": path.stem, "alias": alias if isinstance(alias, str) else
                           path.stem, "path": str(path), "metadata": metadata})
        return listed

    def lora(self, name: str) -> Path:
        """By stem or file name; then by alias (`ss_output_name`), as A1111's tags also use."""
        entries = self._entries("lora", name)
        found = entries.get(name) or next((p for p in entries.values() if p.stem == name), None)
        found = found or next((Path(listed["path"]) for listed in self.loras()
                               if listed["alias"] == name), None)
        if found is None:
            raise self._unknown("lora", name)
        return found

    # ------------------------------------------------------------------ embeddings

    def embeddings(self) -> dict[str, dict[str, Any]]:
        """A1111's /sdapi/v1/embeddings: {"loaded": {token: {...}}, "skipped": {...}}. The token
        is what a prompt writes (the file's stem, or a diffusers file's own token); shape is the
        vectors' width, vectors their count. A file sdaccel cannot read (or over 16 MB) is
        "skipped" under its stem, shape and vectors None."""
        listing: dict[str, dict[str, Any]] = {"loaded": {}, "skipped": {}}
        for path in self._scan("embedding")[0].values():
            token, shape, vectors = self._remember("embedding", path, _embedding_facts)
            where = "loaded" if shape is not None else "skipped"
            listing[where][token] = {"step": None, "sd_checkpoint": None,
                                     "sd_checkpoint_name": None, "shape": shape,
                                     "vectors": vectors}
        return listing

    def embedding_paths(self) -> list[Path]:
        """The embedding files (absolute), for settings' `embeddings:` list."""
        return list(self._scan("embedding")[0].values())

    # ------------------------------------------------------------------ the folders

    def _scan(self, kind: str) -> tuple[dict[str, Path], set[str]]:
        """(file name -> absolute path, sorted by name; the names of links out of the folder).
        The first of two folders with one file name wins."""
        folders, suffixes = {"checkpoint": (CHECKPOINT_FOLDERS, CHECKPOINT_SUFFIXES),
                             "lora": (LORA_FOLDERS, LORA_SUFFIXES),
                             "embedding": (EMBEDDING_FOLDERS, EMBEDDING_SUFFIXES)}[kind]
        found: dict[str, Path] = {}
        escaped: set[str] = set()
        for folder in (self.root / name for name in folders):
            if not folder.is_dir():
                continue
            base = folder.resolve()
            for path in folder.iterdir():
                if path.name in found or path.name.startswith(".") or not (
                        path.suffix.lower() in suffixes and path.is_file()
                        or kind == "checkpoint" and (path / MODEL_INDEX).is_file()):
                    continue
                if path.resolve().is_relative_to(base):
                    found[path.name] = base / path.name
                else:
                    escaped.add(path.name)
        return dict(sorted(found.items(), key=lambda item: item[0].lower())), escaped

    def _entries(self, kind: str, name: str) -> dict[str, Path]:
        """The kind's listing, once `name` is known to be a plain name that is not a link out
        of the folder (else NameNotFound, before any file is opened)."""
        if reason := refusal(name):
            raise NameNotFound(kind, name, [], reason)
        found, escaped = self._scan(kind)
        title = TITLE.fullmatch(name)
        if name not in found and (name in escaped or title and title["file"] in escaped
                                  or any(Path(link).stem == name for link in escaped)):
            raise NameNotFound(kind, name, [], f"it is a link that leads out of the {kind} "
                               "folder")
        return found

    def _unknown(self, kind: str, name: str) -> NameNotFound:
        entries = self._scan(kind)[0].values()
        valid = [self._checkpoint(p).title for p in entries] if kind == "checkpoint" \
            else [_stem(p) for p in entries]
        return NameNotFound(kind, name, valid)

    def _remember(self, what: str, path: Path, compute: Callable[[Path], Any]) -> Any:
        stat = path.stat()
        key = (what, str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._memo:
            self._memo[key] = compute(path)
        return self._memo[key]


def _stem(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def _safetensors_metadata(path: Path) -> dict[str, Any]:
    """The `__metadata__` of a .safetensors file's header, values that hold JSON objects decoded
    (as A1111 lists them); {} for any other file or a header past HEADER_LIMIT."""
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size)) if 2 <= size <= HEADER_LIMIT else {}
    except (OSError, ValueError):
        return {}
    fields = header.get("__metadata__") if isinstance(header, dict) else None
    metadata: dict[str, Any] = {}
    for key, value in (fields if isinstance(fields, dict) else {}).items():
        metadata[key] = value
        if isinstance(value, str) and value.startswith("{"):
            try:
                metadata[key] = json.loads(value)
            except ValueError:
                pass
    return metadata


def _embedding_facts(path: Path) -> tuple[str, int | None, int | None]:
    """(token, width, count) of an embedding file read as the engine reads it; (stem, None,
    None) when it is too big or sdaccel refuses it."""
    if path.stat().st_size > EMBEDDING_READ_LIMIT:
        return path.stem, None, None
    try:
        read = read_embedding(path)
    except Exception:  # ModelNotFoundError / ConfigError: listed as skipped, not an error
        return path.stem, None, None
    return read.token, int(read.vectors.shape[-1]), int(read.vectors.shape[0])


# ---------------------------------------------------------------------- prompt tags


def lora_tags(prompt: str, models: ModelsDir | None) -> tuple[str, list[LoraEntry]]:
    """A1111's `<lora:name:weight>` tags taken out of `prompt` and looked up in `models`:
    (the prompt without them, the LoRAs). As A1111: a tag is replaced by nothing and the rest
    of the text is left exactly as it was; the weight defaults to 1. sdaccel weighs a LoRA's
    UNet and text-encoder parts alike, so of `<lora:name:te:unet>` (or `te=`/`unet=`) the
    text-encoder weight (the first) counts. A name given twice is one LoRA whose weights add
    up (which is what applying it twice does). An unknown name, or any tag when `models` is
    None, is NameNotFound; a weight that is not a number, ValueError."""
    weights: dict[Path, float] = {}

    def take(match: re.Match) -> str:
        name, weight = _tag_parts(match.group(0))
        if models is None:
            raise NameNotFound("lora", name, [], NO_FOLDER)
        path = models.lora(name)
        weights[path] = weights.get(path, 0.0) + weight
        return ""

    text = LORA_TAG.sub(take, prompt)
    return text, [LoraEntry(path=path, weight=weight) for path, weight in weights.items()]


def _tag_parts(tag: str) -> tuple[str, float]:
    """`<lora:name[:te[:unet[:dyn]]]>` (LORA_TAG matched `<lora:` in any case) -> (name, te)."""
    name, *items = tag[len("<lora:"):-1].split(":")
    positional = [item for item in items if "=" not in item]
    named = dict(item.split("=", 1) for item in items if "=" in item)
    given = named.get("te", positional[0] if positional else "1")
    try:
        weight = float(given)
    except ValueError:
        weight = float("nan")
    if not isfinite(weight):
        raise ValueError(f"LoRA tag {tag!r}: the weight {given.strip()!r} is not a number")
    return name.strip(), weight
