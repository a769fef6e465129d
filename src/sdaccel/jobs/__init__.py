"""Batch jobs from a prompts file: parsing, global indices and seeds, the manifest, resume, and
the split of the work across processes (Hugging Face Accelerate's `PartialState`).

A prompts file holds one job per non-blank line: a plain prompt, or a JSON object (a line that
starts with `{`) with a "prompt" and optional per-job overrides (JOB_KEYS: size, guidance, LoRAs,
an init image and mask to start from, hires). Job i (0-based, blank
lines not counted) makes num_images_per_prompt images with global indices i*n .. i*n+n-1, seeds
`seed + j` from the job's own "seed", else settings.seed + i*n + j, and files
img_{index:03d}_steps{steps}.png. Nothing depends on the rank or the number of processes, so the
same job list gives the same files on 1, 2 or 8 processes.

Each process appends one line per saved image to its own manifest.rank{R}.jsonl in io.out_dir;
the main process merges them into manifest.jsonl (ordered by index) before the work starts (what
an earlier, interrupted run left) and after it ends. A run skips every image that the manifest
records and whose file exists; a complete image file that no record names (the run died between
the two writes) is adopted if its PNG metadata matches the job, else the run stops with an error
naming it. Nothing is overwritten. Nothing here imports torch or prints.

prompts_file.py reads the jobs, manifest.py keeps the records and resumes, run.py splits the
work across processes and runs it. A job, its image indices and seeds, the engine's start and
the loop over jobs are sdaccel.runs', shared with the plain run.
"""

from sdaccel.jobs.manifest import MANIFEST, ManifestFollower, read_manifest
from sdaccel.jobs.prompts_file import JOB_KEYS, check_loras, check_sizes, read_jobs
from sdaccel.jobs.run import RunReport, process_settings, process_state, run_jobs, start
from sdaccel.runs import Job

__all__ = ["JOB_KEYS", "MANIFEST", "Job", "ManifestFollower", "RunReport", "check_loras",
           "check_sizes", "process_settings", "process_state", "read_jobs", "read_manifest",
           "run_jobs", "start"]
