"""The prompts file: one job per non-blank line, a plain prompt or a JSON object (a line that
starts with `{`) with a "prompt" and optional per-job overrides (JOB_KEYS); every line validated
up front, errors naming the file, line and key."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from sdaccel.errors import ConfigError, LoraError
from sdaccel.runs import Job
from sdaccel.settings import GenerationSettings, LoraEntry, Settings

JOB_KEYS = ("prompt", "negative_prompt", "seed", "height", "width", "guidance_scale", "loras")
GENERATION_KEYS = ("height", "width", "guidance_scale")


def read_jobs(path: Path, settings: Settings, negative_prompt: str = "") -> list[Job]:
    """Every job of a prompts file, validated up front (errors name the file, line and key).
    Job i is the i-th non-blank line (sdaccel.runs.Job: its images and seeds)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is not part of line 1
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    jobs: list[Job] = []
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
    """The run's generation settings with this line's size/guidance, by the settings' rules."""
    updates = {key: fields[key] for key in GENERATION_KEYS if key in fields}
    if not updates:
        return settings.generation
    try:
        return GenerationSettings.model_validate(
            {**settings.generation.model_dump(), **updates}, strict=True)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] != "value_error":
            message += f" (got {error['input']!r})"
        raise ConfigError(f"{where}: {key}: {message}", key=f"generation.{key}") from None


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
