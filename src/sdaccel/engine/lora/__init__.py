"""LoRA files fused into the engine's weights, switched between batches without reloading the
model or recompiling it. One module per job:

- files.py      reading, hashing and converting a file (diffusers' `lora_state_dict`), before
                the model loads: a bad file fails fast, in one line; the file's family (SD 1.x
                or SDXL) against the model's (`check_fits`, `model_is_sdxl`)
- injection.py  the file's PEFT layers, made by diffusers' own loading (its text-encoder steps
                mirrored) and taken out of the model again
- switcher.py   LoraSwitcher: the set in force, fused into the weights in place from exact
                originals, or left unfused as active PEFT layers
- hooks.py      what must follow a switch that rewrote weights (registered by speed passes)
- tags.py       AUTOMATIC1111's `<lora:name:weight>` prompt tags, found to be named in a warning
"""

from sdaccel.engine.lora.files import (
    LoraFile,
    check_fits,
    model_is_sdxl,
    read_lora,
    read_loras,
    trained_words,
)
from sdaccel.engine.lora.hooks import on_weights_changed, weights_changed
from sdaccel.engine.lora.switcher import LoraSwitcher
from sdaccel.engine.lora.tags import prompt_tags

__all__ = ["LoraFile", "LoraSwitcher", "check_fits", "model_is_sdxl", "on_weights_changed",
           "prompt_tags", "read_lora", "read_loras", "trained_words", "weights_changed"]
