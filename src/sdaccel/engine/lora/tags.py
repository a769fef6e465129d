"""AUTOMATIC1111's `<lora:name:weight>` prompt tags, found so that a warning can name them."""

from __future__ import annotations

import re
from collections.abc import Sequence

LORA_TAG = re.compile(r"<lora:[^>]*>", re.IGNORECASE)


def prompt_tags(texts: Sequence[str]) -> list[str]:
    """AUTOMATIC1111's `<lora:name:weight>` tags in prompts: sdaccel does not read them (it
    would need a folder to look names up in); LoRAs come from --lora / `loras:`."""
    return list(dict.fromkeys(tag for text in texts for tag in LORA_TAG.findall(text)))
