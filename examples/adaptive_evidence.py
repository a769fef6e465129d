"""Does adaptive step scheduling beat fixed steps at the same mean cost? Measured, not assumed.

For a model and a caption set, every image is compared with a high-step reference of the same
seed (DPM-Solver++, `--reference-steps`):

- fixed: DPM-Solver++ at each of `--fixed` steps;
- adaptive: each estimator (pred_var, solver_error) with threshold pairs taken as quantiles of
  that estimator's scores on TRAINING captions (so the held-out captions never tune anything).

Reported per configuration: mean steps (= mean UNet calls per image / 2 with guidance), PSNR and
SSIM to the reference, and (bundled shapes model only) alignment read back by the judge. The
verdict compares each adaptive point with the fixed-step curve interpolated at the same mean steps.

    python examples/adaptive_evidence.py --seeds 1      # bundled:shapes, ~15 min on 2 cores
    python examples/adaptive_evidence.py --model random:tiny --size 32
Writes examples/adaptive_evidence.md and examples/adaptive_evidence.png (needs matplotlib).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from sdaccel import metrics  # noqa: E402
from sdaccel.engine.engine import Engine  # noqa: E402
from sdaccel.settings import resolve_settings  # noqa: E402
from sdaccel.shapes import dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
METHODS = ("pred_var", "solver_error")
QUANTILES = ((0.1, 0.9), (0.25, 0.75), (0.5, 0.9), (0.25, 0.5))


@dataclass
class Point:
    label: str
    mean_steps: float
    psnr: float
    ssim: float
    aligned: float | None
    steps: list[int] = field(default_factory=list)


def engine_for(args, *overrides: str) -> Engine:
    settings = resolve_settings(
        "tiny",
        overrides=[
            f"model_id={args.model}",
            "sampler.name=dpm_solver++",
            f"generation.height={args.size}",
            f"generation.width={args.size}",
            f"generation.guidance_scale={args.guidance}",
            *overrides,
        ],
        environ={},
    ).settings
    return Engine(settings)


def run(engine: Engine, captions: list[str], seeds: list[int]):
    """All captions x seeds; caption k of seed s uses seed s + k, whatever the configuration."""
    results = []
    for seed in seeds:
        results += engine.generate(captions, seed=seed)
    return results


def adaptive_overrides(method: str, low: float, high: float, args) -> list[str]:
    return [
        "adaptive.enabled=true",
        f"adaptive.uncertainty.method={method}",
        f"adaptive.warmup_steps={args.warmup}",
        f"adaptive.min_steps={args.min_steps}",
        f"adaptive.max_steps={args.max_steps}",
        f"adaptive.uncertainty.threshold_low={low:.6g}",
        f"adaptive.uncertainty.threshold_high={high:.6g}",
    ]


def score(label, results, references, captions, judge: bool) -> Point:
    images = [r.image for r in results]
    refs = [r.image for r in references]
    aligned = metrics.alignment(images, captions)["aligned"] if judge else None
    steps = [r.steps for r in results]
    return Point(
        label,
        float(np.mean(steps)),
        metrics.psnr(images, refs),
        metrics.ssim(images, refs),
        aligned,
        steps,
    )


def evaluate(args, captions, seeds, thresholds, judge) -> list[Point]:
    all_captions = captions * len(seeds)
    reference = run(engine_for(args, f"sampler.steps={args.reference_steps}"), captions, seeds)
    points = []
    for steps in args.fixed:
        results = run(engine_for(args, f"sampler.steps={steps}"), captions, seeds)
        points.append(score(f"fixed {steps}", results, reference, all_captions, judge))
        print(_line(points[-1]), flush=True)
    for method, pairs in thresholds.items():
        for (q_low, q_high), (low, high) in pairs:
            engine = engine_for(args, *adaptive_overrides(method, low, high, args))
            results = run(engine, captions, seeds)
            label = f"{method} q{q_low:.2f}-{q_high:.2f} ({low:.3g}, {high:.3g})"
            points.append(score(label, results, reference, all_captions, judge))
            print(_line(points[-1]), flush=True)
    return points


def calibrate(args, captions, seeds) -> dict[str, list]:
    """Threshold pairs per method: quantiles of its scores on the training captions."""
    thresholds = {}
    for method in METHODS:
        probe = engine_for(args, *adaptive_overrides(method, 0.0, 1e9, args))
        scores = [r.plan.score for r in run(probe, captions, seeds)]
        thresholds[method] = [
            ((a, b), (float(np.quantile(scores, a)), float(np.quantile(scores, b))))
            for a, b in QUANTILES
        ]
        print(f"{method}: training scores {np.min(scores):.4g}..{np.max(scores):.4g}", flush=True)
    return thresholds


def versus_fixed(point: Point, fixed: list[Point], attr: str) -> float | None:
    """point's metric minus the fixed-step curve's, interpolated at the same mean steps."""
    xs = [p.mean_steps for p in fixed]
    ys = [getattr(p, attr) for p in fixed]
    value = getattr(point, attr)
    if value is None or None in ys or not xs[0] <= point.mean_steps <= xs[-1]:
        return None
    return value - float(np.interp(point.mean_steps, xs, ys))


def _line(p: Point) -> str:
    aligned = "" if p.aligned is None else f"  aligned {p.aligned:.1%}"
    return (
        f"{p.label:42s} mean steps {p.mean_steps:5.2f}  PSNR {p.psnr:5.2f}  "
        f"SSIM {p.ssim:.3f}{aligned}"
    )


def report(title: str, points: list[Point], n_images: int) -> list[str]:
    fixed = [p for p in points if p.label.startswith("fixed")]
    lines = [
        f"## {title} ({n_images} images per row)",
        "",
        "| configuration | mean steps | PSNR dB | SSIM | aligned | dPSNR vs fixed | "
        "d aligned vs fixed |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in points:
        d_psnr = versus_fixed(p, fixed, "psnr") if p not in fixed else None
        d_al = versus_fixed(p, fixed, "aligned") if p not in fixed else None
        lines.append(
            f"| {p.label} | {p.mean_steps:.2f} | {p.psnr:.2f} | {p.ssim:.3f} | "
            f"{'-' if p.aligned is None else f'{p.aligned:.1%}'} | "
            f"{'-' if d_psnr is None else f'{d_psnr:+.2f}'} | "
            f"{'-' if d_al is None else f'{d_al:+.1%}'} |"
        )
    return lines + [""]


def plot(panels: dict[str, list[Point]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attrs = [("psnr", "PSNR to reference (dB)"), ("aligned", "aligned (judge)")]
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4.2 * len(panels)), squeeze=False)
    for row, (title, points) in enumerate(panels.items()):
        for col, (attr, ylabel) in enumerate(attrs):
            ax = axes[row][col]
            fixed = [p for p in points if p.label.startswith("fixed")]
            if getattr(fixed[0], attr) is None:
                ax.set_visible(False)
                continue
            ax.plot(
                [p.mean_steps for p in fixed],
                [getattr(p, attr) for p in fixed],
                "k-o",
                label="fixed steps",
            )
            for method, marker in zip(METHODS, ("s", "^"), strict=True):
                ours = [p for p in points if p.label.startswith(method)]
                ax.scatter(
                    [p.mean_steps for p in ours],
                    [getattr(p, attr) for p in ours],
                    marker=marker,
                    s=60,
                    label=f"adaptive {method}",
                )
            ax.set_xlabel("mean steps per image (UNet calls / 2)")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:shapes")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--train-captions", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--min-steps", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--fixed", type=int, nargs="+", default=[5, 6, 8, 10, 12, 15, 20])
    parser.add_argument("--reference-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=HERE / "adaptive_evidence")
    args = parser.parse_args()

    judge = args.model.startswith("bundled:shapes")
    seeds = [1000 * (i + 1) for i in range(args.seeds)]
    train = [c for _, c, _ in dataset.examples(args.train_captions, start=10_000)]
    held_out = dataset.held_out_captions()
    thresholds = calibrate(args, train, seeds)
    panels = {
        f"{args.model}, training captions": evaluate(args, train, seeds, thresholds, judge),
        f"{args.model}, held-out captions": evaluate(args, held_out, seeds, thresholds, judge),
    }
    lines = [
        f"# Adaptive vs fixed steps: {args.model}",
        "",
        f"DPM-Solver++, guidance {args.guidance}, {args.size}x{args.size}, seeds {seeds}; "
        f"adaptive warm-up {args.warmup}, steps {args.min_steps}-{args.max_steps}; "
        f"reference: {args.reference_steps} steps, same seed. Thresholds are quantiles of "
        "each estimator's scores on the training captions. dX vs fixed: the adaptive "
        "point minus the fixed-step curve interpolated at the same mean steps "
        "(positive = adaptive better at equal cost).",
        "",
    ]
    for title, points in panels.items():
        n = len(points[0].steps)
        lines += report(title, points, n)
    args.out.with_suffix(".md").write_text("\n".join(lines))
    plot(panels, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
