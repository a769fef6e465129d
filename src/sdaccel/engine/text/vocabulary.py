"""Words a model or a LoRA was trained on, and the words of a prompt outside them.

A model trained on a small closed grammar (the bundled one: `Components.vocabulary`) draws a
word it never saw as some word it did see, or not at all; a LoRA file may list the words it was
trained on (`LoraFile.trained_words`). Both are compared with a prompt's words as split here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# A word as captions and LoRA tags write it: lower-case letters, digits, apostrophes ("it's").
WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    """The words of `text`, lower-cased, in order (punctuation and weighting syntax dropped)."""
    return WORD.findall(text.lower())


def unknown_words(text: str, vocabulary: Iterable[str]) -> list[str]:
    """Words of `text` outside `vocabulary`, each once, in order of first appearance."""
    known = set(vocabulary)
    return list(dict.fromkeys(w for w in words(text) if w not in known))
