"""The bundled model's few-step preset against `tiny`, on the yardstick's held-out images.

`tiny-lcm` (the bundled LCM LoRA, LCM sampler, guidance 1) at 1, 2, 4 and 8 steps, and `tiny`
(DPM-Solver++ 20 steps, guidance 4), on the 36 held-out captions x seeds 1000 and 2000 (caption
k gets seed + k: examples/yardstick.py's 72 images), through the engine. Alignment is the judge's
(sdaccel.shapes.judge); cost is in full-UNet equivalents (a guided step of `tiny` costs 1, an
unguided LCM step 0.5); s/image is the whole image on this machine (text encoder, UNet, VAE).
Writes examples/few_step.md::

    python examples/few_step.py
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sdaccel import metrics  # noqa: E402
from sdaccel.shapes import dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
SEEDS = (1000, 2000)
ROWS = [("tiny", []), *[("tiny-lcm", [f"sampler.steps={n}"]) for n in (1, 2, 4, 8)]]
ATTRS = ["colour", "shape", "background", "count", "size", "position"]


def run(preset: str, overrides: list[str], captions: list[str]) -> tuple[dict, float, float]:
    from sdaccel.engine.engine import Engine
    from sdaccel.settings import resolve_settings

    engine = Engine(resolve_settings(preset, overrides=overrides, environ={}).settings)
    engine.generate(captions[:1], seed=0)  # warm-up, uncounted
    results = []
    start = time.perf_counter()
    for seed in SEEDS:
        results += engine.generate(captions, seed=seed)
    seconds = (time.perf_counter() - start) / len(results)
    alignment = metrics.alignment([r.image for r in results], captions * len(SEEDS))
    return alignment, results[0].cost, seconds


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    captions = dataset.held_out_captions()
    lines = [
        "# Few-step generation on the bundled model (`python examples/few_step.py`)", "",
        f"{len(captions)} held-out captions x seeds {', '.join(map(str, SEEDS))} "
        f"({len(captions) * len(SEEDS)} images), 64x64, fp32, {cpu_name()}, "
        f"{os.cpu_count()} cores.", "",
        "| preset | sampler, steps, guidance | cost | aligned | "
        + " | ".join(ATTRS) + " | s/image |",
        "|---|---|---:|---:|" + "---:|" * len(ATTRS) + "---:|",
    ]
    for preset, overrides in ROWS:
        alignment, cost, seconds = run(preset, overrides, captions)
        from sdaccel.settings import resolve_settings

        s = resolve_settings(preset, overrides=overrides, environ={}).settings
        setting = f"{s.sampler.name} {s.sampler.steps}, {s.generation.guidance_scale:g}"
        cells = " | ".join(f"{alignment[a]:.0%}" for a in ATTRS)
        lines.append(f"| `{preset}` | {setting} | {cost:g} | **{alignment['aligned']:.1%}** | "
                     f"{cells} | {seconds:.3f} |")
        print(lines[-1], flush=True)
    (HERE / "few_step.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
