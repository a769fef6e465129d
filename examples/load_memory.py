"""Peak memory while loading a model: read in fp32 then cast, or straight in bf16.

SD 1.5's architecture with random weights (`random:sd15`) is written once in fp16 as a single
file and as a diffusers folder (2.1 GB each, in a temporary folder); then each is loaded by
`load_components` in a fresh process, once with every part in fp32 (what a cast to bf16 started
from before) and once straight in bf16, while a thread samples the process' memory every 20 ms:
anonymous memory (what the process itself holds) and file-backed pages (the weights file mapped
in, which the kernel can drop under pressure).

    python examples/load_memory.py          # ~3 min on 2 cores, 4.5 GB of temporary disk
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PARTS = ("unet", "vae", "text_encoder")


def write_models(folder: Path) -> tuple[Path, Path]:
    import shutil

    import torch

    from sdaccel.engine.loading.checkpoint import save_checkpoint
    from sdaccel.engine.loading.models import arch_dir, load_components

    parts = load_components("random:sd15")
    single = save_checkpoint(parts, folder / "sd15-fp16.safetensors", dtype=torch.float16)
    tree = folder / "sd15-fp16"
    for part in PARTS:
        getattr(parts, part).to(torch.float16).save_pretrained(tree / part)
    parts.tokenizer.save_pretrained(tree / "tokenizer")
    shutil.copytree(arch_dir("sd15") / "scheduler", tree / "scheduler")
    shutil.copy(arch_dir("sd15") / "model_index.json", tree)
    return single, tree


def measure(ref: str, dtype: str) -> None:
    """In this process: load `ref` with every part in `dtype`, print the peaks in GiB."""
    import torch

    from sdaccel.engine.loading.models import load_components

    peak = {"RssAnon": 0.0, "RssFile": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peak:
                    peak[key] = max(peak[key], int(value.split()[0]) / 2**20)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        load_components(ref, dtypes=dict.fromkeys(PARTS, getattr(torch, dtype)))
    finally:
        done.set()
        sampler.join()
    print(f"{peak['RssAnon']:.2f} {peak['RssFile']:.2f}")


def main() -> None:
    if len(sys.argv) == 3:
        measure(*sys.argv[1:])
        return
    rows = ["| source | parts read in | process memory, peak GiB | file pages, peak GiB |",
            "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        single, tree = write_models(Path(tmp))
        for label, ref in (("fp16 single file", single), ("fp16 diffusers folder", tree)):
            for dtype in ("float32", "bfloat16"):
                out = subprocess.run([sys.executable, __file__, str(ref), dtype], check=True,
                                     capture_output=True, text=True).stdout.split()
                rows.append(f"| {label} | {dtype} | {out[-2]} | {out[-1]} |")
                print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
