"""A tiny CLIP tokenizer for the shapes grammar.

The vocabulary is every single character (plain and word-final, as CLIP's BPE writes them), the
two CLIP special tokens and one token per grammar word. The merges are *learnt* by ordinary BPE
training over the grammar's words (most frequent adjacent pair first) rather than written by
hand: hand-written merge chains clash (a merge meant for "green" firing inside "background"), a
learnt list applies to every word in the same order at encoding time, so each grammar word
encodes to exactly one token. :func:`check_round_trip` verifies this for every caption.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from sdaccel.shapes import dataset

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"
MODEL_MAX_LENGTH = 16
_BASE_CHARS = string.ascii_lowercase + string.digits + ",.-'!?"


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE-train merges until every word is a single symbol (deterministic tie-break)."""
    segs = {w: [*w[:-1], w[-1] + EOW] for w in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for seg in segs.values():
            for a, b in zip(seg, seg[1:], strict=False):
                pairs[(a, b)] += 1
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, seg in segs.items():
            out: list[str] = []
            i = 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    out.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segs[w] = out


def vocab_and_merges(
    words: Iterable[str] | None = None,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    words = list(words if words is not None else dataset.vocabulary())
    merges = learn_merges(words)
    tokens = [BOS, EOS, *_BASE_CHARS, *(c + EOW for c in _BASE_CHARS)]
    tokens += [a + b for a, b in merges]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def build_tokenizer(max_length: int = MODEL_MAX_LENGTH):  # -> transformers.CLIPTokenizer
    from transformers import CLIPTokenizer

    vocab, merges = vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def save_tokenizer(directory: str | Path, max_length: int = MODEL_MAX_LENGTH):
    """Build the tokenizer, check it, save it to ``directory`` and return it."""
    tok = build_tokenizer(max_length)
    check_round_trip(tok)
    tok.save_pretrained(str(directory))
    return tok


def check_round_trip(tok, captions: Iterable[str] | None = None) -> int:
    """Assert that every grammar word is one token and every caption decodes back to itself.

    Returns the number of captions checked.
    """
    for word in dataset.vocabulary():
        ids = tok(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise AssertionError(f"word {word!r} -> {tok.convert_ids_to_tokens(ids)}")
    n = 0
    for text in captions if captions is not None else dataset.all_caption_forms():
        ids = tok(text)["input_ids"]
        if len(ids) > tok.model_max_length:
            raise AssertionError(f"caption {text!r} is {len(ids)} tokens > {tok.model_max_length}")
        if len(ids) != len(text.split()) + 2:
            raise AssertionError(f"caption {text!r} -> {tok.convert_ids_to_tokens(ids)}")
        back = tok.decode(ids, skip_special_tokens=True)
        if back != text:
            raise AssertionError(f"round trip {text!r} -> {back!r}")
        n += 1
    return n
