"""Which steps can be skipped without changing the image? One skipped step at a time.

For the bundled model on the training captions x 2 seeds (frontier.py's set-up), each step k of
the sampler's plan is skipped alone (filled from the solver's history as `adaptive.mode:
per_step` fills it: x0 extrapolated linearly in lambda from the two evaluations before) and every
other step runs the full UNet; the images are compared with the plain run. A step whose skip
alone puts an image below the DRIFT bound (30 dB) can be skipped by no method that keeps that
image: this is what bounds "the same image, cheaper" (issue 12, examples/frontier.md).

With --skips K, K steps two apart are skipped together (k, k + 2, ...), one window every --stride
steps: on a long plan (DDPM 50) the question is which stretches can lose every other call, as
half the cost would need.

    python examples/skip_sensitivity.py              # DPM-Solver++ 20: ~20 min on 2 cores
    python examples/skip_sensitivity.py --sampler ddpm --steps 50 --skips 4 --stride 8  # ~6 min
Writes examples/skip_sensitivity.md, or skip_sensitivity_<sampler><steps>.md for another plan.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import frontier

from sdaccel.engine.sampling.stepwise import PerStep
from sdaccel.shapes import dataset

HERE = Path(__file__).resolve().parent


@dataclass
class SkippingOnly(PerStep):
    """A per-step policy that skips exactly the steps in `skipped` (once an image has two
    evaluations to extrapolate from) and runs both halves of the full UNet everywhere else;
    skipped steps are filled as `adaptive.mode: per_step` fills them."""

    skipped: frozenset[int] = frozenset()

    def decide(self, track, index, t):
        return {(k, half): True for k, image in enumerate(self.images)
                if index not in self.skipped or len(image.history) < 2
                for half in self.guider.halves}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:shapes")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--sampler", default="dpm_solver++")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skips", type=int, default=1, help="steps skipped together, 2 apart")
    parser.add_argument("--stride", type=int, default=1, help="steps between windows")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.out is None:
        plan = "" if (args.sampler, args.steps) == ("dpm_solver++", 20) else (
            f"_{args.sampler}{args.steps}")
        args.out = HERE / f"skip_sensitivity{plan}.md"

    seeds = [1000, 2000]
    captions = [c for _, c, _ in dataset.examples(30, start=10_000)]
    base = (f"sampler.name={args.sampler}", f"sampler.steps={args.steps}")
    plain = frontier.run(frontier.engine_for(args, *base), captions, seeds)
    policy = SkippingOnly()
    engine = frontier.engine_for(args, *base, policy=policy)
    title = ("One skipped step at a time" if args.skips == 1
             else "Every other step of a stretch skipped")
    lines = [f"# {title}: {args.model}, {args.sampler} {args.steps}", "",
             f"Training captions x seeds {seeds} ({len(plain)} images), {args.size}x{args.size}, "
             f"guidance {args.guidance}. {_what(args.skips)}, filled as "
             "`adaptive.mode: per_step` fills it; PSNR of each image to the plain run. "
             f"Regenerate with `python examples/skip_sensitivity.py{_flags(args)}`.", "",
             f"| skipped step{'s' if args.skips > 1 else ''} | worst PSNR dB | 2nd worst | "
             "images below 30 dB |", "|---|---|---|---|"]
    # Steps 0 and 1 have nothing to extrapolate from.
    for start in range(2, args.steps, args.stride):
        steps = [s for s in range(start, start + 2 * args.skips, 2) if s < args.steps]
        policy.skipped = frozenset(steps)
        psnrs = sorted(frontier.capped_psnr(a.image, b.image)
                       for a, b in zip(frontier.run(engine, captions, seeds), plain, strict=True))
        lines.append(f"| {', '.join(map(str, steps))} | {psnrs[0]:.1f} | {psnrs[1]:.1f} | "
                     f"{sum(p < 30 for p in psnrs)} |")
        print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def _what(skips: int) -> str:
    return ("Step k (0-based) skipped alone" if skips == 1 else
            f"{skips} steps (0-based) skipped together, two apart: every other call of a stretch")


def _flags(args) -> str:
    defaults = {"sampler": "dpm_solver++", "steps": 20, "skips": 1, "stride": 1}
    return "".join(f" --{k} {getattr(args, k)}" for k, v in defaults.items()
                   if getattr(args, k) != v)


if __name__ == "__main__":
    main()
