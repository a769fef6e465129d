"""What a whole image costs at several sizes, step counts and guidance, from one engine, timed in
interleaved rounds: the choices a user on a slow machine has (a smaller size, a few-step model
at guidance 1) beside the preset's own.

    python examples/image_costs.py --model random:sdxl --preset sdxl-cpu \
        --case 1024:4:1 --case 768:20:5 --case 768:4:1 --case 512:20:5

A case is SIZE:STEPS:GUIDANCE (square images; guidance 1 makes one UNet call a step instead of
two, as few-step models such as SDXL Lightning, Hyper-SD and LCM are run). Few-step cases use
Euler with the trailing schedule (SDXL Lightning's recipe); the others the preset's sampler.
Random weights draw noise, but every step costs what it costs with real weights. The first call
of each case is not timed (it packs weights and sizes buffers); the time is the median of the
rounds, with each round's time after it. Nothing else should use the CPU meanwhile.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sdaccel.engine.engine import Engine  # noqa: E402
from sdaccel.settings import SamplerSettings, resolve_settings  # noqa: E402

PROMPT = "a watercolor painting of a lighthouse on a cliff at sunset"
FEW_STEPS = 8  # at most this many steps: a few-step model's sampler


def parse_case(text: str) -> tuple[int, int, float]:
    size, steps, guidance = text.split(":")
    return int(size), int(steps), float(guidance)


def run(engine: Engine, case: tuple[int, int, float]) -> float:
    size, steps, guidance = case
    generation = engine.settings.generation.model_copy(update={
        "height": size, "width": size, "guidance_scale": guidance})
    sampler = (SamplerSettings(name="euler", steps=steps, schedule="trailing")
               if steps <= FEW_STEPS else engine.settings.sampler.model_copy(
                   update={"steps": steps}))
    started = time.perf_counter()
    engine.generate([PROMPT], seed=42, generation=generation, sampler=sampler)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:sdxl")
    parser.add_argument("--preset", default="sdxl-cpu")
    parser.add_argument("--case", action="append", required=True, metavar="SIZE:STEPS:GUIDANCE")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cases = [parse_case(text) for text in args.case]
    engine = Engine(resolve_settings(args.preset, overrides=[f"model_id={args.model}"]).settings)
    print(f"{args.model}, `{args.preset}` preset (UNet {engine.settings.unet_dtype}, "
          f"{', '.join(engine.passes)}), {os.cpu_count()} CPUs, one image per call\n")
    for case in cases:
        run(engine, case)
    times: dict[tuple, list[float]] = {case: [] for case in cases}
    for _ in range(args.rounds):
        for case in cases:
            times[case].append(run(engine, case))
    print("| size | steps | guidance | UNet rows (steps x halves) | s per image (per round) |")
    print("|---|---|---|---|---|")
    for (size, steps, guidance), seconds in times.items():
        rows = steps * (2 if guidance > 1 else 1)
        print(f"| {size}x{size} | {steps} | {guidance:g} | {rows} | "
              f"{statistics.median(seconds):.1f} ({', '.join(f'{s:.1f}' for s in seconds)}) |")


if __name__ == "__main__":
    main()
