"""Which steps can be skipped without changing the image? One skipped step at a time.

For the bundled model on the training captions x 2 seeds (frontier.py's set-up), each step k of
the sampler's plan is skipped alone (filled from the solver's history as `adaptive.mode:
per_step` fills it: x0 extrapolated linearly in lambda from the two evaluations before) and every
other step runs the full UNet; the images are compared with the plain run. A step whose skip
alone puts an image below the DRIFT bound (30 dB) can be skipped by no method that keeps that
image: this is what bounds "the same image, cheaper" (issue 12, examples/frontier.md).

    python examples/skip_sensitivity.py              # DPM-Solver++ 20: ~20 min on 2 cores
    python examples/skip_sensitivity.py --sampler ddpm --steps 50
Writes examples/skip_sensitivity.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import frontier

from sdaccel.engine import stepwise
from sdaccel.shapes import dataset

HERE = Path(__file__).resolve().parent


def skipping_only(steps: set[int]):
    """A StepwiseDenoiser._decide that skips exactly `steps` (once an image has two evaluations
    to extrapolate from) and runs both halves of the full UNet everywhere else."""
    def decide(self, images, index, lam, protected, guided, cutoff):
        slots = {}
        for k, image in enumerate(images):
            if index in steps and len(image.history) >= 2:
                continue
            slots[(k, stepwise.COND)] = True
            if guided:
                slots[(k, stepwise.UNCOND)] = True
        return slots
    return decide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:shapes")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--sampler", default="dpm_solver++")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=HERE / "skip_sensitivity.md")
    args = parser.parse_args()

    seeds = [1000, 2000]
    captions = [c for _, c, _ in dataset.examples(30, start=10_000)]
    base = (f"sampler.name={args.sampler}", f"sampler.steps={args.steps}")
    plain = frontier.run(frontier.engine_for(args, *base), captions, seeds)
    engine = frontier.engine_for(args, *base, *frontier.PER_STEP, "adaptive.skip.threshold=0.1")
    lines = [f"# One skipped step at a time: {args.model}, {args.sampler} {args.steps}", "",
             f"Training captions x seeds {seeds} ({len(plain)} images), {args.size}x{args.size}, "
             f"guidance {args.guidance}. Step k (0-based) skipped alone, filled as "
             "`adaptive.mode: per_step` fills it; PSNR of each image to the plain run. "
             "Regenerate with `python examples/skip_sensitivity.py`.", "",
             "| skipped step | worst PSNR dB | 2nd worst | images below 30 dB |",
             "|---|---|---|---|"]
    for step in range(2, args.steps):  # steps 0 and 1 have nothing to extrapolate from
        stepwise.StepwiseDenoiser._decide = skipping_only({step})
        psnrs = sorted(frontier._psnr(a.image, b.image)
                       for a, b in zip(frontier.run(engine, captions, seeds), plain, strict=True))
        lines.append(f"| {step} | {psnrs[0]:.1f} | {psnrs[1]:.1f} | "
                     f"{sum(p < 30 for p in psnrs)} |")
        print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
