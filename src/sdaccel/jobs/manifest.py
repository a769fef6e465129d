"""The manifest of a batch run, and resume.

Each process appends one line per saved image to its own manifest.rank{R}.jsonl in io.out_dir;
the main process merges them into manifest.jsonl (ordered by index) before the work starts (what
an earlier, interrupted run left) and after it ends. A run skips every image that the manifest
records and whose file exists; a complete image file that no record names (the run died between
the two writes) is adopted if its PNG metadata matches the job, else the run stops with an error
naming it. Nothing is overwritten.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdaccel.catalogue import SAMPLERS
from sdaccel.errors import ConfigError, SdaccelError, writing
from sdaccel.outputs import IMAGE_NAME, read_metadata, temporary_file
from sdaccel.runs import Job
from sdaccel.settings import Settings

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
PART_GLOB = "manifest.rank*.jsonl"
PARTIAL_GLOB = ".partial-*"  # temporary files of outputs._write_new and of the manifest merge


# --------------------------------------------------------------------------- records


def expected_fields(job: Job, j: int, settings: Settings) -> dict[str, Any]:
    """What a record (or PNG) of image j of `job` must say for this run to count it as done."""
    g = job.generation
    fields = {
        "prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seeds[j],
        "width": g.width, "height": g.height, "guidance_scale": g.guidance_scale,
        "sampler": settings.sampler.name, "schedule": settings.sampler.schedule,
        "eta": settings.sampler.eta_in_force, "model": settings.model_id,
    }
    if not settings.adaptive.enabled:
        fields["steps"] = settings.sampler.steps
    fields["loras"] = _lora_fields(settings.loras if job.loras is None else job.loras)
    fields.update(_start_fields(job, settings))
    return fields


def _start_fields(job: Job, settings: Settings) -> dict[str, Any]:
    """Image to image, inpainting and the hires fix as a record states them (outputs.
    start_fields); None where they do not apply, as records made before they existed read."""
    hires = settings.hires if job.hires is None else job.hires
    return {
        "init_image": job.init_image and job.init_image.record(),  # path and sha256
        "strength": job.generation.strength if job.init_image else None,
        "mask": job.mask and job.mask.record(),
        "mask_blur": job.mask_blur if job.mask else None,
        "hires": hires.model_dump(mode="json") if hires.enabled else None,
    }


def _lora_fields(loras) -> list[dict[str, Any]]:
    """LoRA files and weights as a record states them (absolute paths; sha256 not compared:
    the settings may not give one)."""
    return [{"path": str(Path(lora.path).expanduser().resolve()), "weight": float(lora.weight)}
            for lora in loras]


def manifest_record(saved: dict[str, Any], job: Job) -> dict[str, Any]:
    """A RunWriter record as a manifest line: file names relative to out_dir, the job index."""
    record = {"index": saved["index"], "job": job.index, "file": Path(saved["path"]).name}
    record.update({k: v for k, v in saved.items()
                   if k not in ("index", "path", "latents_path")})
    if "latents_path" in saved:
        record["latents_file"] = Path(saved["latents_path"]).name
    return record


def part_path(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / f"manifest.rank{rank}.jsonl"


class ManifestWriter:
    """One process's manifest: a line per saved image, appended whole and flushed to disk."""

    def __init__(self, out_dir: Path, rank: int) -> None:
        self.path = part_path(out_dir, rank)

    def append(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, sort_keys=True) + "\n").encode()
        with writing(self.path):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)


class ManifestFollower:
    """New records of the per-rank manifests as they grow (progress across every process)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self._offsets: dict[str, int] = {}

    def poll(self) -> list[dict[str, Any]]:
        records = []
        for path in sorted(self.out_dir.glob(PART_GLOB)):
            offset = self._offsets.get(path.name, 0)
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1  # complete lines only
            for line in data[:end].splitlines():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
            self._offsets[path.name] = offset + end
        return records


def _read_lines(path: Path, torn_tail_ok: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of a manifest; a last line without its newline (a write cut short
    by a crash) is skipped where `torn_tail_ok`."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    if torn_tail_ok and lines and lines[-1]:
        log.info("%s: ignoring an incomplete last line (interrupted write)", path)
        lines[-1] = b""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{path}:{number}: not a valid manifest line ({exc})") from None
        if not (isinstance(record, dict) and isinstance(record.get("index"), int)
                and isinstance(record.get("file"), str)):
            raise ConfigError(f"{path}:{number}: not a manifest record (needs an integer "
                              f"'index' and a 'file')")
        yield number, record


# --------------------------------------------------------------------------- resume


@dataclass
class Plan:
    """Where a job list stands in out_dir: what is done, what is left."""

    total_images: int  # images in the job list
    done: set[int]  # image indices recorded in the manifest (of this job list)
    pending: list[Job]  # jobs with at least one image missing

    @property
    def pending_images(self) -> int:
        return self.total_images - len(self.done)

    @classmethod
    def of(cls, jobs: list[Job], per_prompt: int, recorded: set[int]) -> Plan:
        total = len(jobs) * per_prompt
        return cls(total, {i for i in recorded if i < total},
                   [job for job in jobs
                    if any(i not in recorded for i in job.image_indices(per_prompt))])


def consolidate(jobs: list[Job], settings: Settings, source: Path) -> Plan:
    """Merge every manifest in out_dir into manifest.jsonl, check it against the job list,
    adopt complete but unrecorded images, drop temporary files. Main process only, while no
    other process writes."""
    out_dir = Path(settings.io.out_dir)
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    per_prompt = settings.generation.num_images_per_prompt
    expected = {job.index * per_prompt + j: (job, expected_fields(job, j, settings))
                for job in jobs for j in range(per_prompt)}
    manifest = out_dir / MANIFEST
    parts = sorted(out_dir.glob(PART_GLOB))
    records: dict[int, dict[str, Any]] = {}
    sources: list[tuple[Path, bool]] = [(manifest, False)] if manifest.is_file() else []
    for path, torn_tail_ok in [*sources, *((p, True) for p in parts)]:
        for number, record in _read_lines(path, torn_tail_ok):
            index = record["index"]
            if index in expected:
                job, wanted = expected[index]
                _check(record, wanted, f"{path}:{number}: image {index}", source, job)
                if not (out_dir / record["file"]).is_file():
                    log.warning("%s:%d: %s is missing; image %d will be made again",
                                path, number, record["file"], index)
                    records.pop(index, None)
                    continue
            records[index] = record
    for index, name in sorted(_image_files(out_dir)):
        recorded = records.get(index)
        if (recorded is not None and recorded["file"] == name) or index not in expected:
            continue
        job, wanted = expected[index]
        if recorded is not None:
            raise SdaccelError(
                f"{out_dir / name}: {manifest} records {recorded['file']} as image {index}; "
                f"this file is not that image. Move it away, or use another --out-dir")
        records[index] = _adopt(out_dir / name, index, job, wanted, source)
    for partial in out_dir.glob(PARTIAL_GLOB):
        partial.unlink(missing_ok=True)
    _write_manifest(manifest, records)
    for part in parts:
        part.unlink(missing_ok=True)
    return Plan.of(jobs, per_prompt, set(records))


def _check(record: dict[str, Any], wanted: dict[str, Any], what: str, source: Path,
           job: Job) -> None:
    for key, value in wanted.items():
        got = record.get(key)
        if key == "loras":  # records before LoRAs existed have none; sha256 is not compared
            got = [{"path": x.get("path"), "weight": x.get("weight")} for x in got or []]
        elif key in ("schedule", "eta") and key not in record:
            # records before these settings existed: the sampler's own schedule and eta
            got = ("default" if key == "schedule"
                   else getattr(SAMPLERS.get(record.get("sampler")), "eta", None))
        if got != value:
            raise ConfigError(
                f"{what} was made with {key} {_shown(record.get(key))}, but {source} line "
                f"{job.line} with these settings asks for {_shown(value)}. Resume with the same "
                f"prompts file and settings, or use another --out-dir")


def _shown(value: Any) -> str:
    """A field's value in an error: a file (init image, mask) as its path and short sha256."""
    if isinstance(value, dict) and set(value) == {"path", "sha256"}:
        return f"{value['path']} (sha256 {str(value['sha256'])[:12]})"
    return repr(value)


def _image_files(out_dir: Path) -> Iterator[tuple[int, str]]:
    for path in out_dir.iterdir():
        if match := IMAGE_NAME.match(path.name):
            yield int(match.group(1)), path.name


def _adopt(path: Path, index: int, job: Job, wanted: dict[str, Any],
           source: Path) -> dict[str, Any]:
    """A complete image no manifest names (written just before a crash): its record, rebuilt
    from its PNG metadata, when it is exactly this job's image."""
    try:
        image = json.loads(read_metadata(path)["sdaccel"])["image"]
    except (OSError, KeyError, ValueError, TypeError):
        raise SdaccelError(
            f"{path}: not recorded in {path.parent / MANIFEST} and not an sdaccel image; "
            f"image {index} of {source} line {job.line} would need its name. Move it away, "
            f"or use another --out-dir") from None
    _check(image, wanted, f"{path} (not in {MANIFEST})", source, job)
    log.info("%s: complete but not recorded; adopted as image %d", path, index)
    return {"index": index, "job": job.index, "file": path.name, **image, "seconds": None}


def _write_manifest(path: Path, records: dict[int, dict[str, Any]]) -> None:
    """All records ordered by index, replacing manifest.jsonl in one rename."""
    with writing(path):
        fd, tmp = temporary_file(path.parent, ".partial-manifest-")
        try:
            with os.fdopen(fd, "w") as f:
                for index in sorted(records):
                    f.write(json.dumps(records[index], sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)


def read_manifest(out_dir: Path) -> list[dict[str, Any]]:
    """The merged manifest's records, ordered by index."""
    path = Path(out_dir) / MANIFEST
    return [record for _, record in _read_lines(path, False)] if path.is_file() else []


