"""The run: this process's share of the missing images (Hugging Face Accelerate's
`PartialState` splits the jobs), saved and recorded as they are made."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sdaccel import runs
from sdaccel.errors import SdaccelError
from sdaccel.jobs.manifest import ManifestWriter, Plan, consolidate, manifest_record, read_manifest
from sdaccel.jobs.prompts_file import check_loras, check_sizes
from sdaccel.runs import Job

# The end-of-run barrier waits for the slowest process; the default (10-30 min) is too short for
# a long, unevenly split job list. A failed process still ends the run: the launcher stops all.
BARRIER_TIMEOUT = timedelta(hours=24)


def process_settings(settings):
    """This process's Accelerate state, and the settings it runs with: with several processes
    on CUDA, cuda:{local rank} whatever `device` said (a copy: the caller's stay as resolved)."""
    from sdaccel.engine.loading.precision import resolve_device

    state = process_state(cpu=resolve_device(settings.device).type == "cpu")
    if state.num_processes > 1 and state.device.type == "cuda":
        settings = settings.model_copy(update={"device": str(state.device)})
    return state, settings


def start(settings, jobs: list[Job], source: Path, on_event: Callable[[Any], None]):
    """The engine (warm from the compile cache) and the writer for `jobs`, with every line's size
    and LoRA files checked before any image is made (errors name the line of `source`)."""
    from sdaccel.outputs import RunWriter

    engine, _ = runs.start_engine(settings, on_event)
    check_sizes(jobs, engine.check_size, source)
    check_loras(jobs, engine.prepare_loras, source)
    return engine, RunWriter(settings, engine.components.name, engine.components.model_hash)


def process_state(cpu: bool):
    """Accelerate's PartialState: this process's rank, device and the world it belongs to
    (launched by `accelerate launch` or `torchrun`; a single process otherwise)."""
    from accelerate import PartialState

    state = PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != state.num_processes:
        raise SdaccelError(f"launched as {launched} processes but Accelerate set up "
                           f"{state.num_processes}; check the launcher's settings")
    return state


@dataclass
class RunReport:
    total_images: int  # images in the job list
    done_before: int  # images already made when this run started
    made_here: int  # images this process made
    records: list[dict[str, Any]]  # the merged manifest at the end (main process only)


def run_jobs(engine, writer, jobs: list[Job], state, source: Path,
             on_ready: Callable[[Plan], None] | None = None,
             on_finished: Callable[[], None] | None = None) -> RunReport:
    """Make every missing image of `jobs`, this process's share of them.

    `engine` generates (sdaccel.engine.Engine), `writer` saves (sdaccel.outputs.RunWriter, on
    the same Settings object), `state` is Accelerate's PartialState. `on_ready(plan)` runs on the
    main process once the work is known; `on_finished()` once every process is done, before the
    manifests are merged.
    """
    settings = engine.settings
    per_prompt = settings.generation.num_images_per_prompt
    if state.is_main_process:
        consolidate(jobs, settings, source)
    state.wait_for_everyone()
    out_dir = Path(settings.io.out_dir)
    plan = Plan.of(jobs, per_prompt, {record["index"] for record in read_manifest(out_dir)})
    if state.is_main_process and on_ready is not None:
        on_ready(plan)
    manifest = ManifestWriter(out_dir, state.process_index)
    made = 0
    with state.split_between_processes(plan.pending) as mine:
        for job, index, result in runs.images(engine, mine):
            if index in plan.done:
                continue
            saved = writer.save(result, index=index, sources=job.sources())
            manifest.append(manifest_record(saved, job))
            made += 1
    state.wait_for_everyone()
    records: list[dict[str, Any]] = []
    if state.is_main_process:
        if on_finished is not None:
            on_finished()
        consolidate(jobs, settings, source)
        records = read_manifest(out_dir)
    return RunReport(plan.total_images, len(plan.done), made, records)
