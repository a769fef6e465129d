"""The bundled model's few-step preset against `tiny`, on the yardstick's held-out images.

`tiny-lcm` (the bundled LCM LoRA, LCM sampler, guidance 1) at 1, 2, 4 and 8 steps, and `tiny`
(DPM-Solver++ 20 steps, guidance 4), on the 36 held-out captions x seeds 1000 and 2000 (caption
k gets seed + k: examples/yardstick.py's 72 images), through the engine. Alignment is the judge's
(sdaccel.shapes.judge); NFE counts UNet rows per image (a guided step: 2, an unguided LCM step:
1); s/image is the whole image on this machine (text encoder, UNet, VAE), batches of 36.
Writes examples/few_step.md (or few_step_more_seeds.md)::

    python examples/few_step.py                 # the 72 images issue 28's bar names
    python examples/few_step.py --more-seeds    # 144: seeds 3000 and 4000 as well
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sdaccel import metrics  # noqa: E402
from sdaccel.shapes import dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
SEEDS = (1000, 2000)  # --more-seeds adds 3000 and 4000
ROWS = [("tiny", []), *[("tiny-lcm", [f"sampler.steps={n}"]) for n in (1, 2, 4, 8)]]
ATTRS = ["colour", "shape", "background", "count", "size", "position"]


def run(preset: str, overrides: list[str], captions: list[str],
        seeds: tuple[int, ...]) -> tuple[dict, str, int, float]:
    """Alignment, the row's sampler setting, its UNet rows per image, and s/image."""
    from sdaccel.engine.engine import Engine
    from sdaccel.settings import resolve_settings

    engine = Engine(resolve_settings(preset, overrides=overrides, environ={}).settings)
    s = engine.settings
    setting = f"{s.sampler.name} {s.sampler.steps}, {s.generation.guidance_scale:g}"
    engine.generate(captions[:1], seed=0)  # warm-up, uncounted
    results = []
    start = time.perf_counter()
    for seed in seeds:
        results += engine.generate(captions, seed=seed)
    seconds = (time.perf_counter() - start) / len(results)
    alignment = metrics.alignment([r.image for r in results], captions * len(seeds))
    return alignment, setting, results[0].nfe, seconds


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    more = "--more-seeds" in sys.argv[1:]
    seeds = (*SEEDS, 3000, 4000) if more else SEEDS
    captions = dataset.held_out_captions()
    lines = [
        "# Few-step generation on the bundled model (`python examples/few_step.py`)", "",
        f"{len(captions)} held-out captions x seeds {', '.join(map(str, seeds))} "
        f"({len(captions) * len(seeds)} images), 64x64, fp32, {cpu_name()}, "
        f"{os.cpu_count()} cores.", "",
        "| preset | sampler, steps, guidance | NFE | aligned | "
        + " | ".join(ATTRS) + " | s/image |",
        "|---|---|---:|---:|" + "---:|" * len(ATTRS) + "---:|",
    ]
    for preset, overrides in ROWS:
        alignment, setting, nfe, seconds = run(preset, overrides, captions, seeds)
        cells = " | ".join(f"{alignment[a]:.0%}" for a in ATTRS)
        lines.append(f"| `{preset}` | {setting} | {nfe} | **{alignment['aligned']:.1%}** | "
                     f"{cells} | {seconds:.3f} |")
        print(lines[-1], flush=True)
    name = "few_step_more_seeds.md" if more else "few_step.md"
    (HERE / name).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
