"""What a row's images are meant to be, and how good they are: the recipe that chooses an image
(so a row knows whether it should reproduce its reference's picture or makes a different one by
design), and the bundled model's quality yardstick (caption alignment read by the shapes judge).

PSNR to the reference only measures quality where the two rows are meant to make the same image
(a faster loop, another precision, a speed pass). A 4-step LCM image is another picture than the
20-step DPM-Solver++ one of the same seed, however good it is: such a row says what differs, and
the drift bounds do not judge it. No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdaccel.settings import Settings

# The bundled model whose prompts are the shape captions the judge reads back.
SHAPES_MODEL = "bundled:shapes"

# Settings that only approximate the image the rest chooses (where it runs, in what precision,
# compiled or not, speed passes, adaptive compute, where files go), or that read the prompts
# every row shares alike when they hold no A1111 syntax (prompt.weighting). A row that differs
# from its reference here alone is meant to make the same picture, and drift bounds judge it.
APPROXIMATING = ("device", "unet_dtype", "vae_dtype", "text_encoder_dtype", "compile", "optimize",
                 "adaptive", "io", "prompt")

# What a plain diffusers pipeline row (contestants.load_pipeline) makes of the settings; any
# other recipe key keeps its default there (e.g. it loads no textual-inversion embeddings), so
# a configuration that sets one differs from it.
PIPELINE_HONOURS = ("model_id", "seed", "sampler.", "generation.", "loras", "tiny_decoder")


def recipe(settings: Settings, steps: int) -> dict[str, Any]:
    """The settings that choose a row's image, as dotted keys, with `steps` (the solver's plan:
    an adaptive re-plan run's is adaptive.max_steps) in place of sampler.steps."""
    data = _flatten(settings.model_dump(mode="json", exclude=set(APPROXIMATING)))
    data["sampler.steps"] = steps
    return data


def pipeline_recipe(settings: Settings, steps: int) -> dict[str, Any]:
    """The recipe of a diffusers pipeline built from `settings`: what it does not honour stays
    at its default."""
    ours, default = recipe(settings, steps), recipe(Settings(), steps)
    return {key: value if key.startswith(PIPELINE_HONOURS) else default.get(key)
            for key, value in ours.items()}


def differences(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """What makes `mine` another picture than `theirs`, each as 'mine vs theirs'; [] when the
    two recipes choose the same image."""
    out: list[str] = []
    keys = [k for k in dict.fromkeys([*mine, *theirs]) if mine.get(k) != theirs.get(k)]
    if {"sampler.name", "sampler.steps"} & set(keys):
        out.append(f"{mine.get('sampler.steps')} {mine.get('sampler.name')} steps vs "
                   f"{theirs.get('sampler.steps')} {theirs.get('sampler.name')}")
    if {"generation.height", "generation.width"} & set(keys):
        out.append(f"{_size(mine)} vs {_size(theirs)}")
    shown = {"sampler.name", "sampler.steps", "generation.height", "generation.width"}
    for key in (k for k in keys if k not in shown):
        out.append(_difference(key, mine.get(key), theirs.get(key)))
    return out


def _difference(key: str, mine: Any, theirs: Any) -> str:
    if key == "generation.guidance_scale":
        return f"guidance {mine:g} vs {theirs:g}"
    if key == "loras":
        return f"LoRA {_loras(mine)} vs {_loras(theirs)}"
    if key == "tiny_decoder":
        return f"decoder {_decoder(mine)} vs {_decoder(theirs)}"
    if key == "model_id":
        return f"model {mine} vs {theirs}"
    return f"{key} {_value(mine)} vs {_value(theirs)}"


def _size(recipe_: dict[str, Any]) -> str:
    return f"{recipe_.get('generation.height')}x{recipe_.get('generation.width')}"


def _loras(entries: list[dict] | None) -> str:
    if not entries:
        return "none"
    return ", ".join(f"{Path(e['path']).name}:{e['weight']:g}" for e in entries)


def _decoder(reference: str | None) -> str:
    return f"tiny ({Path(reference).name or reference})" if reference else "full VAE"


def _value(value: Any) -> str:
    return "none" if value is None or value == [] else str(value)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------------- the yardstick


def uses_captions(model_id: str) -> bool:
    """Whether the model's prompts are the shape captions its judge reads back."""
    return model_id == SHAPES_MODEL


def default_prompts(model_ids: Sequence[str], calls: int) -> list[str] | None:
    """Held-out shape captions (as many as the run makes calls, up to all of them) where a row
    runs the bundled model, so its alignment can be judged; None: the seed's prompts."""
    if not any(uses_captions(m) for m in model_ids):
        return None
    from sdaccel.shapes import dataset

    return dataset.held_out_captions()[:max(1, calls)]


def caption_alignment(images: Sequence, captions: Sequence[str]) -> float | None:
    """Share of images in which the judge reads every attribute its caption states; None where
    a prompt is not a caption of the shapes grammar (nothing to read back)."""
    from sdaccel.shapes import dataset, judge

    try:
        for caption in dict.fromkeys(captions):
            dataset.parse_caption(caption)
    except ValueError:
        return None
    if not images:
        return None
    return sum(judge.score(image, text).aligned for image, text in
               zip(images, captions, strict=True)) / len(images)
