"""Files a run leaves behind: images named img_{index:03d}_steps{steps}.png with their metadata,
an optional grid and optional final latents. Nothing here ever replaces an existing file.

Every file is written under a temporary name in the same folder and then hard-linked to its final
name, which fails if that name exists (another run got there first): the index moves on, and no
reader ever sees a half-written PNG.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdaccel.catalogue import SCHEDULE_LABELS, a1111_label
from sdaccel.catalogue import sampler as catalogue_sampler
from sdaccel.errors import SdaccelError, writing

IMAGE_NAME = re.compile(r"^img_(\d{3,})_steps\d+\.png$")

# hires.upscaler -> A1111's name of the same upscaler (`Hires upscaler:`, its hr_upscaler field)
HIRES_UPSCALER_LABELS = {"latent": "Latent", "latent-nearest": "Latent (nearest)",
                         "lanczos": "Lanczos"}


def next_index(out_dir: Path) -> int:
    """One past the highest image index already in out_dir (0 for a new folder)."""
    if not out_dir.is_dir():
        return 0
    indices = [int(m.group(1)) for p in out_dir.iterdir() if (m := IMAGE_NAME.match(p.name))]
    return max(indices, default=-1) + 1


def image_name(index: int, steps: int) -> str:
    return f"img_{index:03d}_steps{steps}.png"


def a1111_parameters(
    prompt: str, negative_prompt: str, steps: int, sampler: str, cfg_scale: float, seed: int,
    width: int, height: int, model: str, adaptive: str | None = None,
    compute: str | None = None, model_hash: str | None = None,
    loras: Sequence[dict[str, Any]] = (), embeddings: Sequence[dict[str, str]] = (),
    decoder: dict[str, str] | None = None, schedule_type: str | None = None,
    eta: tuple[str, float] | None = None, denoising_strength: float | None = None,
    mask_blur: int | None = None, hires: dict[str, Any] | None = None,
) -> str:
    """The 'parameters' text chunk in the layout AUTOMATIC1111's readers parse (extra
    `Key: value` pairs, like the adaptive decision, are part of that layout). `model_hash`: a
    single-file model's A1111 hash (Components.model_hash), before `Model:` as A1111 writes it.
    `embeddings`: the embedding records in force; those the prompts use go to `TI hashes`.
    `schedule_type`: A1111 1.9+'s label of a schedule other than the model's own (Karras);
    `eta`: (A1111's key, value) of an eta other than the sampler's default ("Eta DDIM", 0.5).
    `denoising_strength`: image to image's strength, or the hires pass's; `mask_blur`: an
    inpainting mask's blur; `hires`: the hires settings of a second pass that ran."""
    for lora in loras:  # A1111 keeps <lora:name:weight> in the prompt it records
        if f"<lora:{lora['name']}:" not in prompt:
            prompt += f" <lora:{lora['name']}:{lora['weight']:g}>"
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    hashed = f"Model hash: {model_hash}, " if model_hash else ""
    scheduled = f"Schedule type: {schedule_type}, " if schedule_type else ""
    settings_line = (f"Steps: {steps}, Sampler: {sampler}, {scheduled}CFG scale: {cfg_scale:g}, "
                     f"Seed: {seed}, Size: {width}x{height}, {hashed}Model: {model}")
    if decoder:  # a tiny decoder, where A1111 names the VAE file: 10 hex of its sha256, name
        name = re.sub("[:,]", "", decoder["name"])  # A1111 splits the line at ", " and ": "
        settings_line += f", VAE hash: {decoder['sha256'][:10]}, VAE: {name}"
    settings_line += _a1111_start_fields(denoising_strength, mask_blur, hires)
    if eta:  # where A1111 writes its extra generation parameters
        settings_line += f", {eta[0]}: {eta[1]:g}"
    if adaptive:
        settings_line += f", Adaptive steps: {adaptive}"
    if compute:
        settings_line += f", Adaptive compute: {compute}"
    if loras:  # as A1111's Lora extension: name (no ':' or ','), 12 hex of its AutoV3 hash
        hashes = ", ".join(f"{re.sub('[:,]', '', lora['name'])}: {lora['short_hash']}"
                           for lora in loras)
        settings_line += f', Lora hashes: "{hashes}"'
    used = [e for e in embeddings if _uses(f"{prompt}\n{negative_prompt}", e["token"])]
    if used:  # as A1111: the embeddings the prompts use, 12 hex of the whole file's sha256
        hashes = ", ".join(f"{re.sub('[:,]', '', e['token'])}: {e['sha256'][:12]}" for e in used)
        settings_line += f', TI hashes: "{hashes}"'
    lines.append(settings_line)
    return "\n".join(lines)


def _a1111_start_fields(denoising_strength: float | None, mask_blur: int | None,
                        hires: dict[str, Any] | None) -> str:
    """Image to image, inpainting and the hires fix as A1111 writes them (its
    extra_generation_params, in its order)."""
    text = ""
    if denoising_strength is not None:
        text += f", Denoising strength: {denoising_strength:g}"
    if mask_blur is not None:
        text += f", Mask blur: {mask_blur}"
    if hires:
        text += f", Hires upscale: {hires['scale']:g}"
        if hires["steps"]:
            text += f", Hires steps: {hires['steps']}"
        text += f", Hires upscaler: {HIRES_UPSCALER_LABELS[hires['upscaler']]}"
    return text


def _uses(text: str, token: str) -> bool:
    """Whether `text` has `token` as a word of its own (the tokenizer lower-cases both)."""
    return re.search(rf"(?<!\w){re.escape(token)}(?!\w)", text, re.IGNORECASE) is not None


def describe_plan(plan) -> str:
    """One adaptive decision in words: 'pred_var 0.143 -> 12 of 20 steps (warm-up 5)'."""
    return (f"{plan.method} {plan.score:.3f} -> {plan.total_steps} of {plan.max_steps} steps "
            f"(warm-up {plan.warmup_steps})")


def describe_compute(cost: float, steps: int, decisions: str) -> str | None:
    """Per-step decisions in words, 'cost 10.96 of 20 (FFFFCCFCC...)'; None when every step ran
    the full UNet (nothing to say)."""
    if set(decisions) <= {"F"}:
        return None
    return f"cost {cost:.2f} of {steps} ({decisions})"


def png_metadata(parameters: str, record: dict[str, Any]) -> PngInfo:
    info = PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("sdaccel", json.dumps(record, sort_keys=True))
    return info


def read_metadata(path: Path) -> dict[str, str]:
    """The text chunks of a PNG written here (parameters, sdaccel)."""
    with Image.open(path) as image:
        return dict(image.text)


def temporary_file(folder: Path, prefix: str) -> tuple[int, str]:
    """tempfile.mkstemp in `folder` (fd, path), given the mode a plain open() would have under
    the process umask, not mkstemp's owner-only 0600: it takes its final name by link or rename."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, name


def _write_new(out_dir: Path, name_for: Callable[[int], str], index: int,
               write: Callable[[Path], None], exact: bool = False) -> tuple[int, Path]:
    """Write via `write(tmp_path)`, then claim the first free name from `index` on (only
    `index` itself where `exact`: a taken name is then an error)."""
    with writing(out_dir / name_for(index)):
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = temporary_file(out_dir, ".partial-")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            write(tmp)
            while True:
                final = out_dir / name_for(index)
                try:
                    os.link(tmp, final)
                    return index, final
                except FileExistsError:
                    if exact:
                        raise SdaccelError(f"{final} already exists; refusing to overwrite "
                                           f"it (another run writes to {out_dir}?)") from None
                    index += 1
        finally:
            tmp.unlink(missing_ok=True)


def _numbered(stem: str, attempt: int, suffix: str) -> str:
    return f"{stem}{suffix}" if attempt == 0 else f"{stem}_{attempt}{suffix}"


def save_image(out_dir: Path, index: int, steps: int, image: Image.Image,
               metadata: PngInfo, exact: bool = False) -> tuple[int, Path]:
    """Save as img_{index}_steps{steps}.png, or the next free index (never another one where
    `exact`); returns (index, path)."""
    return _write_new(out_dir, lambda i: image_name(i, steps), index,
                      lambda tmp: image.save(tmp, format="PNG", pnginfo=metadata), exact)


def save_latents(image_path: Path, latents) -> Path:
    """Final latents beside their image: img_007_steps20.latents.safetensors."""
    from safetensors.torch import save_file

    stem = image_path.name.removesuffix(".png")
    _, path = _write_new(image_path.parent,
                         lambda i: _numbered(f"{stem}.latents", i, ".safetensors"), 0,
                         lambda tmp: save_file({"latents": latents.contiguous()}, str(tmp)))
    return path


def save_grid(out_dir: Path, images: Sequence[Image.Image], first: int, last: int) -> Path:
    """All images of a run in one near-square grid: grid_{first:03d}-{last:03d}.png."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for k, image in enumerate(images):
        grid.paste(image, ((k % columns) * width, (k // columns) * height))
    base = f"grid_{first:03d}-{last:03d}"
    _, path = _write_new(out_dir, lambda i: _numbered(base, i, ".png"), 0,
                         lambda tmp: grid.save(tmp, format="PNG"))
    return path


def start_fields(result, sources: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an image started from, as its record states it: `strength` (image to image),
    `mask_blur` (inpainting), `hires` (the settings of a second pass that ran), and the caller's
    `sources` (init_image, mask: path and sha256); only those that apply."""
    fields: dict[str, Any] = {}
    strength = getattr(result, "strength", None)
    if strength is not None:
        fields["strength"] = strength
    mask_blur = getattr(result, "mask_blur", None)
    if mask_blur is not None:
        fields["mask_blur"] = mask_blur
    hires = getattr(result, "hires", None)
    if hires is not None:
        fields["hires"] = hires.model_dump(mode="json")
    fields.update(sources or {})
    return fields


def image_metadata(result, settings, model_name: str, model_hash: str | None = None,
                   sources: dict[str, Any] | None = None
                   ) -> tuple[dict[str, Any], str, PngInfo]:
    """One ImageResult's record fields, its A1111 `parameters` text and the PNG chunks holding
    both and the settings it was made with (a server keeps them in memory, RunWriter on disk).
    `sources`: the files it started from, {"init_image": {"path", "sha256"}, "mask": ...}."""
    from sdaccel import __version__
    from sdaccel.settings import settings_as_dict

    s, g = settings, result.generation
    loras = getattr(result, "loras", ())  # the LoRA records of engine/lora/
    started = start_fields(result, sources)
    hires = started.get("hires")
    image_info = {
        "prompt": result.prompt, "negative_prompt": result.negative_prompt,
        "seed": result.seed, "steps": result.steps, "nfe": result.nfe,
        "cost": round(result.cost, 4), "decisions": result.decisions,
        "sampler": s.sampler.name, "schedule": s.sampler.schedule, "eta": s.sampler.eta_in_force,
        "guidance_scale": g.guidance_scale, "width": g.width, "height": g.height,
        "model": model_name,
        "plan": dataclasses.asdict(result.plan) if result.plan else None,
        "loras": [dict(lora) for lora in loras],  # path, weight, sha256, name, hash
    }
    decoder = getattr(result, "decoder", None)  # a tiny decoder's record (loading/decoders.py)
    if decoder:
        image_info["tiny_decoder"] = dict(decoder)  # path, name, sha256
    image_info.update(started)
    parameters = a1111_parameters(
        result.prompt, result.negative_prompt, result.steps, a1111_label(s.sampler.name),
        g.guidance_scale, result.seed, g.width, g.height, model_name,
        describe_plan(result.plan) if result.plan else None,
        describe_compute(result.cost, result.steps, result.decisions), loras=loras,
        model_hash=model_hash, embeddings=result.embeddings, decoder=decoder,
        denoising_strength=started.get("strength", hires and hires["denoising_strength"]),
        mask_blur=started.get("mask_blur"), hires=hires, **_a1111_sampler_fields(s.sampler),
    )
    metadata = png_metadata(parameters, {
        "version": __version__, "image": image_info,
        "settings": {**settings_as_dict(s), "model_id": _absolute_if_local(s.model_id),
                     "tiny_decoder": s.tiny_decoder and _absolute_if_local(s.tiny_decoder),
                     "generation": g.model_dump(mode="json"),
                     # the hires fix as it ran (a prompts-file line's own), or off
                     "hires": hires or {**s.hires.model_dump(mode="json"), "enabled": False},
                     # the files in force, each with its token and sha256
                     "embeddings": [dict(e) for e in result.embeddings],
                     # the LoRAs it was made with (a prompts-file line's own), sha256 included
                     "loras": [{k: lora[k] for k in ("path", "weight", "sha256")}
                               for lora in loras]},
    })
    return image_info, parameters, metadata


def _a1111_sampler_fields(sampler) -> dict[str, Any]:
    """The schedule and eta as A1111 records them: only where they are not the defaults."""
    entry = catalogue_sampler(sampler.name)
    fields: dict[str, Any] = {}
    if sampler.schedule != "default":
        fields["schedule_type"] = SCHEDULE_LABELS[sampler.schedule]
    if sampler.eta is not None and sampler.eta != entry.eta:
        fields["eta"] = (entry.eta_label, sampler.eta)
    return fields


def _absolute_if_local(model_id: str) -> str:
    """A model folder or file as an absolute path (as the loader reads it, `~` expanded), so the
    metadata regenerates the image from any working directory; other ids as they are."""
    path = Path(model_id).expanduser()
    return str(path.resolve()) if path.exists() else model_id


class RunWriter:
    """Saves one run's images in order, continuing after the images out_dir already holds."""

    def __init__(self, settings, model_name: str, model_hash: str | None = None) -> None:
        self.settings = settings
        self.model_name, self.model_hash = model_name, model_hash
        self.out_dir = Path(settings.io.out_dir)
        self.first_index = next_index(self.out_dir)
        self._next = self.first_index
        self.records: list[dict[str, Any]] = []
        self._grid_images: list[Image.Image] = []

    def save(self, result, index: int | None = None,
             sources: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write one ImageResult (with latents if asked); returns its record, as --json prints.

        With `index` the image gets exactly that index (a prompts-file run's global index), and
        an existing file of that name is an error. `sources`: the files it started from
        (runs.Job.sources())."""
        s = self.settings
        image_info, _, metadata = image_metadata(result, s, self.model_name, self.model_hash,
                                                 sources)
        index, path = save_image(self.out_dir, self._next if index is None else index,
                                 result.steps, result.image, metadata, exact=index is not None)
        self._next = index + 1
        record = {"index": index, "path": str(path), **image_info,
                  "seconds": round(result.seconds, 4)}
        if s.io.save_latents:
            record["latents_path"] = str(save_latents(path, result.latents))
        if s.io.save_grid:
            self._grid_images.append(result.image)
        self.records.append(record)
        return record

    def finish(self) -> Path | None:
        """The grid of this run's images, when io.save_grid asks for one and there are two+."""
        if len(self._grid_images) < 2:
            return None
        return save_grid(self.out_dir, self._grid_images,
                         self.records[0]["index"], self.records[-1]["index"])
