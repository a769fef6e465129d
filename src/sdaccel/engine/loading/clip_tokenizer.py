"""CLIP ViT-L/14's tokenizer (SD 1.5's), built offline from the BPE merges open_clip ships.

Stable Diffusion 1.5 reads prompts with OpenAI CLIP's byte-level BPE tokenizer (vocabulary
49,408). Its vocabulary and merges are not in any package here, but the PyPI package
`open-clip-torch` carries the merges file OpenAI CLIP was released with
(`open_clip/bpe_simple_vocab_16e6.txt.gz`), and the vocabulary follows from it: OpenAI's
`SimpleTokenizer` builds it as the 256 byte characters, the same with `</w>` appended, the first
49152-256-2 merges joined, then `<|startoftext|>` (49406) and `<|endoftext|>` (49407). That is the
hub tokenizer's `vocab.json` / `merges.txt`, so transformers' `CLIPTokenizer` built from the two
gives the hub tokenizer's ids.

The files are built once into `<sdaccel cache>/tokenizers/clip-vit-large-patch14/` and loaded
from there. open_clip is located without importing it (its import pulls in torchvision); install
it with `pip install --no-deps open-clip-torch==3.3.0` (its torchvision dependency would pull in
a second torch).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sdaccel.cache_dir import cache_root
from sdaccel.errors import ModelNotFoundError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
INSTALL = "pip install --no-deps open-clip-torch==3.3.0"
NAME = "clip-vit-large-patch14"
VOCAB_SIZE = 49408
N_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77
TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": MODEL_MAX_LENGTH,
    "bos_token": BOS,
    "eos_token": EOS,
    "pad_token": EOS,  # as SD 1.5's tokenizer pads (stable-diffusion-v1-5/tokenizer)
    "unk_token": EOS,
}


def bpe_merges_file() -> Path:
    """open_clip's `bpe_simple_vocab_16e6.txt.gz`, found without importing open_clip."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / BPE_FILE
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"the CLIP tokenizer (SD 1.5's) is built from {BPE_FILE} in the package open-clip-torch, "
        f"which is not installed: {INSTALL}"
    )


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable character table (the byte-level alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


def vocab_and_merges(bpe_file: str | Path) -> tuple[dict[str, int], list[str]]:
    """The vocabulary (token -> id) and merges ("a b" lines) of OpenAI's SimpleTokenizer."""
    lines = gzip.open(bpe_file).read().decode("utf-8").split("\n")
    merges = lines[1:N_MERGES + 1]  # line 0 is the file's version header
    alphabet = list(bytes_to_unicode().values())
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *("".join(m.split()) for m in merges),
              BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(merges) != N_MERGES or len(vocab) != VOCAB_SIZE:
        raise ModelNotFoundError(
            f"{bpe_file}: not OpenAI CLIP's merges file ({len(merges)} merges, vocabulary "
            f"{len(vocab)}; expected {N_MERGES} and {VOCAB_SIZE}); reinstall with: {INSTALL}"
        )
    return vocab, merges


def write_tokenizer_files(folder: str | Path, bpe_file: str | Path | None = None) -> Path:
    """vocab.json, merges.txt and tokenizer_config.json of CLIP ViT-L/14's tokenizer."""
    folder = Path(folder)
    vocab, merges = vocab_and_merges(bpe_file or bpe_merges_file())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                       encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    return folder


def tokenizer_dir(root: Path | None = None) -> Path:
    """The cached tokenizer folder, built on first use (atomically: a folder is whole or absent).
    Where the cache cannot be written, the files go to a fresh temporary folder instead."""
    folder = (root or cache_root()) / "tokenizers" / NAME
    if (folder / "tokenizer_config.json").is_file():
        return folder
    bpe_file = bpe_merges_file()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=folder.parent))
    except OSError:
        return write_tokenizer_files(tempfile.mkdtemp(prefix=f"sdaccel-{NAME}-"), bpe_file)
    try:
        write_tokenizer_files(staging, bpe_file)
        os.replace(staging, folder)
    except OSError:  # another process built it first (the folder exists), or a failed write
        if not (folder / "tokenizer_config.json").is_file():  # (a full disk): build it aside
            return write_tokenizer_files(tempfile.mkdtemp(prefix=f"sdaccel-{NAME}-"), bpe_file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def clip_tokenizer(**kwargs: Any):
    """A fresh transformers `CLIPTokenizer` of CLIP ViT-L/14 (ids as the hub tokenizer's)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tokenizer_dir(), **kwargs)
