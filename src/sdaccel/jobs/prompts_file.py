"""The prompts file: one job per non-blank line, a plain prompt or a JSON object (a line that
starts with `{`) with a "prompt" and optional per-job overrides (JOB_KEYS); every line validated
up front, init images and masks read whole, errors naming the file, line and key."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from sdaccel.errors import ConfigError, LoraError
from sdaccel.runs import DEFAULT_MASK_BLUR, MAX_MASK_BLUR, Job, StartFile
from sdaccel.settings import GenerationSettings, HiresSettings, LoraEntry, Settings

JOB_KEYS = ("prompt", "negative_prompt", "seed", "height", "width", "guidance_scale", "loras",
            "init_image", "mask", "strength", "mask_blur", "hires")
GENERATION_KEYS = ("height", "width", "guidance_scale", "strength")


def read_jobs(path: Path, settings: Settings, negative_prompt: str = "",
              mask_blur: int = DEFAULT_MASK_BLUR) -> list[Job]:
    """Every job of a prompts file, validated up front (errors name the file, line and key;
    init images and masks read whole). Job i is the i-th non-blank line (sdaccel.runs.Job: its
    images and seeds); `negative_prompt` and `mask_blur` serve lines without their own."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is not part of line 1
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    jobs: list[Job] = []
    files: dict[Path, StartFile] = {}  # each init image or mask read once
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        where = f"{path}:{number}"
        fields = _parse_line(line, where)
        jobs.append(Job.at(
            len(jobs), fields["prompt"], settings,
            negative_prompt=fields.get("negative_prompt", negative_prompt),
            seed=fields.get("seed"), generation=_generation(settings, fields, where),
            loras=_loras(fields["loras"], where) if "loras" in fields else None, line=number,
            **_start(fields, path.parent, where, settings, files, mask_blur),
        ))
    if not jobs:
        raise ConfigError(f"{path}: no prompts (one per line, or one JSON object per line "
                          f"with a \"prompt\")")
    return jobs


def _parse_line(line: str, where: str) -> dict[str, Any]:
    if not line.startswith("{"):
        return {"prompt": line}
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"{where}: expected one JSON object per line")
    valid = ", ".join(JOB_KEYS)
    for key in fields:
        if key not in JOB_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {valid}")
    if "prompt" not in fields:
        raise ConfigError(f"{where}: missing key 'prompt' (valid keys: {valid})")
    for key in ("prompt", "negative_prompt"):
        if key in fields and not isinstance(fields[key], str):
            raise ConfigError(f"{where}: {key}: must be a string (got {fields[key]!r})")
    if not fields["prompt"].strip():
        raise ConfigError(f"{where}: prompt: must not be empty")
    if "seed" in fields:
        seed = fields["seed"]
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ConfigError(f"{where}: seed: must be an integer from 0 to 2**63-1 "
                              f"(got {seed!r})")
    return fields


def _generation(settings: Settings, fields: dict[str, Any], where: str) -> GenerationSettings:
    """The run's generation settings with this line's size/guidance/strength, by the settings'
    rules."""
    updates = {key: fields[key] for key in GENERATION_KEYS if key in fields}
    if not updates:
        return settings.generation
    return _validated(settings.generation, updates, where, "generation", "")


def _validated(section, updates: dict[str, Any], where: str, name: str, shown: str):
    """`section` (a settings section) with `updates`, by the settings' rules; an error names
    the line and the key (`shown` + key)."""
    try:
        return type(section).model_validate({**section.model_dump(), **updates}, strict=True)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] != "value_error":
            message += f" (got {error['input']!r})"
        raise ConfigError(f"{where}: {shown}{key}: {message}", key=f"{name}.{key}") from None


def _start(fields: dict[str, Any], folder: Path, where: str, settings: Settings,
           files: dict[Path, StartFile], mask_blur: int) -> dict[str, Any]:
    """A line's init_image and mask (paths relative to the prompts file's folder, read and
    checked now), mask_blur and hires: Job.at's keyword arguments."""
    start: dict[str, Any] = {"mask_blur": mask_blur}
    for key in ("init_image", "mask"):
        if key not in fields:
            continue
        value = fields[key]
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}: {key}: must be an image file's path (got {value!r})")
        path = (folder / Path(value).expanduser()).resolve()
        if path not in files:
            files[path] = StartFile.read(path, f"{where}: {key}")
        start[key] = files[path]
    for key, needs in (("mask", "init_image"), ("strength", "init_image"),
                       ("mask_blur", "mask")):
        if key in fields and needs not in fields:
            raise ConfigError(f"{where}: {key}: only with {needs}")
    if "mask_blur" in fields:
        blur = fields["mask_blur"]
        if not isinstance(blur, int) or isinstance(blur, bool) or \
                not 0 <= blur <= MAX_MASK_BLUR:
            raise ConfigError(f"{where}: mask_blur: must be an integer from 0 to "
                              f"{MAX_MASK_BLUR} (got {blur!r})")
        start["mask_blur"] = blur
    if "hires" in fields:
        start["hires"] = _hires(fields["hires"], settings, where)
    return start


def _hires(value: Any, settings: Settings, where: str) -> HiresSettings:
    """A line's "hires": true / false (the hires fix on or off with the run's hires settings),
    or an object of `hires:` keys over the run's (on, unless it says "enabled": false)."""
    if isinstance(value, bool):
        updates = {"enabled": value}
    elif isinstance(value, dict):
        updates = {"enabled": True, **value}
    else:
        raise ConfigError(f"{where}: hires: must be true, false or an object of hires keys "
                          f"({', '.join(HiresSettings.model_fields)}) (got {value!r})")
    return _validated(settings.hires, updates, where, "hires", "hires.")


def _loras(value: Any, where: str) -> tuple[LoraEntry, ...]:
    """A line's "loras": a list of "FILE[:WEIGHT]" strings or {"path", "weight"} objects."""
    if not isinstance(value, list):
        raise ConfigError(f"{where}: loras: must be a list of \"FILE[:WEIGHT]\" or "
                          f"{{\"path\": ..., \"weight\": ...}} (got {value!r})")
    try:
        return tuple(TypeAdapter(list[LoraEntry]).validate_python(value))
    except LoraError as exc:
        raise LoraError(f"{where}: {exc}") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in ("loras", *error["loc"]))
        raise ConfigError(f"{where}: {key}: {error['msg']}") from None


def check_loras(jobs: list[Job], check: Callable[[list[Any]], Any], source: Path) -> None:
    """Read and check each line's LoRA files up front (e.g. Engine.prepare_loras), so that a
    missing or foreign file stops the run before any image is made; errors name the line."""
    for job in jobs:
        if job.loras:
            try:
                check(list(job.loras))
            except LoraError as exc:
                raise LoraError(f"{source}:{job.line}: {exc}") from None


def check_sizes(jobs: list[Job], check: Callable[[int, int], None], source: Path) -> None:
    """Run the model's own size check (e.g. Engine.check_size) on every job's size."""
    seen: set[tuple[int, int]] = set()
    for job in jobs:
        size = (job.generation.height, job.generation.width)
        if size in seen:
            continue
        try:
            check(*size)
        except ConfigError as exc:
            raise ConfigError(f"{source}:{job.line}: {exc}", key=exc.key) from None
        seen.add(size)
