"""The checkpoints a server can run: the one it started with and, with `serve --models-dir`, the
folder's (serve/models_dir.py), each as A1111's sd-models lists it; and which of the folder's
embeddings a model takes. A name from a request is looked up here, never opened as a path."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdaccel.engine.text.embeddings import fits, read_embedding
from sdaccel.errors import SdaccelError
from sdaccel.serve.checks import BadRequest
from sdaccel.serve.models_dir import EMBEDDING_READ_LIMIT, Checkpoint, ModelsDir, NameNotFound
from sdaccel.settings import EmbeddingEntry


@dataclass(frozen=True)
class ModelInfo:
    """A checkpoint as A1111 names it, and the model_id sdaccel loads it by."""

    title: str  # what options' sd_model_checkpoint holds
    model_name: str  # what an image's metadata calls it (`Model:`)
    filename: str
    sha256: str | None
    hash: str | None
    model_id: str

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> ModelInfo:
        return cls(checkpoint.title, checkpoint.model_name, checkpoint.filename,
                   checkpoint.sha256, checkpoint.hash, checkpoint.filename)

    def listing(self) -> dict[str, Any]:
        """A1111's /sdapi/v1/sd-models item."""
        item = asdict(self)
        del item["model_id"]
        return {**item, "config": None}


def started_model(engine, model_id: str, models_dir: ModelsDir | None) -> ModelInfo:
    """The model a server started with: the folder's checkpoint when it is one of the folder's
    files, else as the engine names it."""
    path = Path(model_id).expanduser()
    if models_dir is not None and path.exists() and path.resolve().parent.parent == \
            models_dir.root:
        try:
            return ModelInfo.of(models_dir.checkpoint(path.resolve().name))
        except NameNotFound:
            pass
    name = engine.components.name
    return ModelInfo(name, name, model_id, None, engine.components.model_hash, model_id)


def every_model(started: ModelInfo, models_dir: ModelsDir | None) -> list[ModelInfo]:
    """The started model and the folder's checkpoints, once each."""
    found = [ModelInfo.of(c) for c in models_dir.checkpoints()] if models_dir else []
    return found if started.title in {m.title for m in found} else [started, *found]


def find_model(name: Any, started: ModelInfo, models_dir: ModelsDir | None,
               field: str) -> ModelInfo:
    """The model a request names (title, file name, model name or hash), or a BadRequest on
    `field` listing the valid names."""
    if name in (started.title, started.model_name):
        return started
    if models_dir is None:
        raise BadRequest(field, f"{name!r} is not served here; valid: {started.title!r} (start "
                         "the server with --models-dir DIR to switch checkpoints)")
    try:
        return ModelInfo.of(models_dir.checkpoint(str(name)))
    except NameNotFound as exc:
        if exc.reason:
            raise BadRequest(field, str(exc)) from None
        valid = ", ".join(m.title for m in every_model(started, models_dir))
        raise BadRequest(field, f"unknown checkpoint {name!r}; valid: {valid}") from None


# ---------------------------------------------------------------------- the folder's embeddings


def fitting_embeddings(engine, models_dir: ModelsDir | None,
                       have: list[EmbeddingEntry]) -> list[EmbeddingEntry]:
    """The folder's embeddings that `engine`'s model can take (made for its family, vectors as
    wide as its text encoders', a token it does not know yet), besides those in `have`: A1111
    loads those and lists the others as skipped. None for an engine that shows no text encoder
    (a test's)."""
    components = getattr(engine, "components", None)
    if models_dir is None or not hasattr(components, "text_encoders"):
        return []
    encoders = [encoder for _, encoder in components.text_encoders]
    known = {word.lower() for word in components.tokenizer.get_vocab()}
    taken = {Path(entry.path).resolve() for entry in have}
    found = []
    for path in models_dir.embedding_paths():
        if path.resolve() in taken or path.stat().st_size > EMBEDDING_READ_LIMIT:
            continue
        try:
            read = read_embedding(path)
        except SdaccelError:
            continue
        if fits(read, encoders) and read.token.lower() not in known:
            known.add(read.token.lower())
            found.append(EmbeddingEntry(path=path))
    return found


def embeddings_listing(engine, models_dir: ModelsDir | None) -> dict[str, dict[str, Any]]:
    """A1111's /sdapi/v1/embeddings: the folder's embeddings, "loaded" those `engine` took and
    "skipped" the rest (all it lists, for an engine that shows none)."""
    if models_dir is None:
        return {"loaded": {}, "skipped": {}}
    listing = models_dir.embeddings()
    loaded = getattr(engine, "embeddings", None)
    if loaded is None:
        return listing
    tokens = {e.file.token for e in loaded}
    for token in [t for t in listing["loaded"] if t not in tokens]:
        listing["skipped"][token] = listing["loaded"].pop(token)
    return listing
