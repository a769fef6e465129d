"""Is adaptive compute above the fixed-step curve? Every method as a point on one cost axis.

On the bundled model (or another model given with --model), for training-distribution captions
and the held-out captions, each configuration generates every caption x seed and is compared:

- with a high-step reference of the same seed (DPM-Solver++, --reference-steps): PSNR / SSIM,
  and (bundled model) alignment read back by the judge;
- with the plain run of its own sampler and step count (no adaptive compute): worst-image PSNR /
  SSIM, the DRIFT bound of `sdaccel bench` (>= 30 dB and >= 0.95: "the same image").

Cost is the engine's own figure: UNet work in full-UNet equivalents (FLOP-counted; a plain
20-step image costs 20). The fixed-step curve is DPM-Solver++ at --fixed steps; every other
point is compared with that curve interpolated at its own cost (dPSNR, d aligned: positive =
better than fixed steps at equal cost). Configurations: the per-step methods (step skipping,
feature caching, guidance reuse and cut-off, and combinations), and the seed's re-plan scheme
with thresholds at quantiles of its training-caption scores.

The packaged setting is picked on the TRAINING captions only: the highest dPSNR among the
settings that cost <= --budget of the plain run and lose at most 1 alignment point to it; the
held-out numbers of that choice are reported beside. Then, for the seed's presets' samplers
(DDPM 50, DPM-Solver++ 20 and 10), the same image cheaper: the per-step settings against the
plain run of that sampler, held-out captions.

    python examples/frontier.py                  # bundled:shapes, 2 seeds: ~30 min on 2 cores
    python examples/frontier.py --seeds 1 --quick
Writes examples/frontier.md and examples/frontier.png (needs matplotlib).
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from sdaccel import metrics  # noqa: E402
from sdaccel.bench import PSNR_CAP_DB  # noqa: E402
from sdaccel.engine.engine import Engine  # noqa: E402
from sdaccel.settings import resolve_settings  # noqa: E402
from sdaccel.shapes import dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
PER_STEP = ("adaptive.enabled=true", "adaptive.mode=per_step")

# label -> settings overrides (on top of DPM-Solver++ 20 steps, the tiny preset's guidance).
W3 = "adaptive.warmup_steps=3"
METHODS: dict[str, tuple[str, ...]] = {
    **{f"skip {th} x{m} w3": (*PER_STEP, f"adaptive.skip.threshold={th}",
                              f"adaptive.skip.max_consecutive={m}", W3)
       for th, m in ((0.1, 2), (0.2, 2), (0.5, 3))},
    # The fixed-step curve flattens above ~16 steps: a shorter grid with skipping.
    **{f"{n} steps, skip {th} x2 w3": (*PER_STEP, f"sampler.steps={n}",
                                       f"adaptive.skip.threshold={th}",
                                       "adaptive.skip.max_consecutive=2", W3)
       for n, th in ((12, 0.1), (13, 0.1), (14, 0.1), (14, 0.12), (16, 0.1), (16, 0.2))},
    **{f"cache {n} L0 w3{'' if f else ' reuse'}": (
        *PER_STEP, f"adaptive.cache.interval={n}", f"adaptive.cache.forecast={str(f).lower()}",
        W3) for n, f in ((2, True), (3, True), (3, False))},
    "cache 3 L0 w2 final 0": (*PER_STEP, "adaptive.cache.interval=3", "adaptive.warmup_steps=2",
                              "adaptive.skip.final_steps=0"),
    **{f"guidance every 2 w3{'' if f else ' reuse'}": (
        *PER_STEP, "adaptive.guidance.interval=2", f"adaptive.guidance.forecast={str(f).lower()}",
        W3) for f in (True, False)},
    "guidance cut-off 0.5": (*PER_STEP, "adaptive.guidance.cutoff=0.5"),
    "guidance agree 0.05": (*PER_STEP, "adaptive.guidance.agree_threshold=0.05"),
}
# Candidates for "the same image, cheaper" (against the plain run of each sampler).
SAME_IMAGE = ("cache 3 L0 w2 final 0", "cache 3 L0 w3", "skip 0.2 x2 w3", "skip 0.5 x3 w3")
QUICK = ("cache 2 L0 w3", "16 steps, skip 0.2 x2 w3", "guidance every 2 w3", "guidance cut-off 0.5")


@dataclass
class Point:
    label: str
    cost: float  # mean full-UNet equivalents per image
    costs: list[float]
    psnr: float  # mean PSNR to the reference (dB, capped)
    ssim: float
    aligned: float | None
    psnrs: list[float]  # per image, to the reference
    plain_psnr_min: float | None = None  # worst image against the plain run
    plain_ssim_min: float | None = None
    overrides: tuple[str, ...] = ()


def engine_for(args, *overrides: str, **engine_options) -> Engine:
    """The engine for these settings overrides; `engine_options`: Engine's own (unet_wrappers,
    policy)."""
    settings = resolve_settings("tiny", overrides=[
        f"model_id={args.model}", "sampler.name=dpm_solver++", "sampler.steps=20",
        f"generation.height={args.size}", f"generation.width={args.size}",
        f"generation.guidance_scale={args.guidance}", *overrides], environ={}).settings
    return Engine(settings, **engine_options)


def run(engine: Engine, captions: list[str], seeds: list[int]):
    """Caption k of seed s uses seed s + k, whatever the configuration."""
    return [r for seed in seeds for r in engine.generate(captions, seed=seed)]


def capped_psnr(a, b) -> float:
    """PSNR capped at PSNR_CAP_DB, so that an identical image does not make a mean infinite."""
    return min(metrics.psnr(a, b), PSNR_CAP_DB)


def score(label, results, reference, captions, judge, overrides=(), plain=None) -> Point:
    images = [r.image for r in results]
    psnrs = [capped_psnr(a, b.image) for a, b in zip(images, reference, strict=True)]
    point = Point(label, statistics.fmean(r.cost for r in results), [r.cost for r in results],
                  statistics.fmean(psnrs), metrics.ssim(images, [r.image for r in reference]),
                  metrics.alignment(images, captions)["aligned"] if judge else None, psnrs,
                  overrides=tuple(overrides))
    if plain is not None:
        point.plain_psnr_min = min(capped_psnr(a, b.image)
                                   for a, b in zip(images, plain, strict=True))
        point.plain_ssim_min = min(metrics.ssim(a, b.image)
                                   for a, b in zip(images, plain, strict=True))
    return point


def versus_fixed(point: Point, fixed: list[Point], attr: str) -> float | None:
    """point's metric minus the fixed-step curve's at the same cost (None outside the curve)."""
    xs = [p.cost for p in fixed]
    ys = [getattr(p, attr) for p in fixed]
    value = getattr(point, attr)
    if value is None or None in ys or not xs[0] <= point.cost <= xs[-1]:
        return None
    return value - float(np.interp(point.cost, xs, ys))


def replan_methods(args, captions, seeds) -> dict[str, tuple[str, ...]]:
    """The seed's scheme, thresholds at quantiles of pred_var scores on training captions."""
    base = ("adaptive.enabled=true", "adaptive.mode=replan", "adaptive.warmup_steps=4",
            "adaptive.min_steps=5", "adaptive.max_steps=20")
    probe = engine_for(args, *base, "adaptive.uncertainty.threshold_low=0",
                       "adaptive.uncertainty.threshold_high=1e9")
    scores = [r.plan.score for r in run(probe, captions, seeds)]
    methods = {}
    for low, high in ((0.1, 0.9),):
        lo, hi = (float(np.quantile(scores, q)) for q in (low, high))
        methods[f"replan pred_var q{low}-{high}"] = (
            *base, f"adaptive.uncertainty.threshold_low={lo:.6g}",
            f"adaptive.uncertainty.threshold_high={hi:.6g}")
    return methods


def evaluate(args, captions, seeds, methods, judge) -> list[Point]:
    all_captions = captions * len(seeds)
    reference = run(engine_for(args, f"sampler.steps={args.reference_steps}"), captions, seeds)
    plain = {}
    points = []
    for steps in args.fixed:
        results = run(engine_for(args, f"sampler.steps={steps}"), captions, seeds)
        plain[steps] = results
        points.append(score(f"fixed {steps}", results, reference, all_captions, judge))
        print(_line(points[-1]), flush=True)
    for label, overrides in methods.items():
        engine = engine_for(args, *overrides)
        steps = engine.settings.sampler.steps
        if steps not in plain:
            plain[steps] = run(engine_for(args, f"sampler.steps={steps}"), captions, seeds)
        results = run(engine, captions, seeds)
        points.append(score(label, results, reference, all_captions, judge, overrides,
                            plain[steps] if "replan" not in label else plain[20]))
        print(_line(points[-1]), flush=True)
    return points


def _line(p: Point) -> str:
    aligned = "" if p.aligned is None else f"  aligned {p.aligned:.1%}"
    return f"{p.label:34s} cost {p.cost:5.2f}  PSNR {p.psnr:5.2f}  SSIM {p.ssim:.3f}{aligned}"


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def report(title: str, points: list[Point]) -> list[str]:
    fixed = [p for p in points if p.label.startswith("fixed")]
    lines = [f"## {title} ({len(points[0].psnrs)} images per row)", "",
             "| configuration | cost | cost min-max | PSNR dB | SSIM | aligned | dPSNR vs fixed "
             "| d aligned vs fixed | worst PSNR / SSIM vs its plain run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        d_psnr = None if p in fixed else versus_fixed(p, fixed, "psnr")
        d_al = None if p in fixed else versus_fixed(p, fixed, "aligned")
        worst = ("-" if p.plain_psnr_min is None
                 else f"{p.plain_psnr_min:.1f} / {p.plain_ssim_min:.3f}")
        lines.append(
            f"| {p.label} | {p.cost:.2f} | {min(p.costs):.1f}-{max(p.costs):.1f} | "
            f"{p.psnr:.2f} | {p.ssim:.3f} | {_fmt(p.aligned, '.1%')} | {_fmt(d_psnr, '+.2f')} | "
            f"{_fmt(d_al, '+.1%')} | {worst} |")
    return lines + [""]


def alignment_tolerance(plain: Point) -> float:
    """One binomial standard error of the plain run's aligned rate: on 60-72 images one image
    is 1.4-1.7 points, so a tighter rule would choose by single images."""
    if plain.aligned is None:
        return 0.0
    return (plain.aligned * (1 - plain.aligned) / len(plain.psnrs)) ** 0.5


def choose(points: list[Point], budget: float) -> Point | None:
    """Best dPSNR vs fixed among the settings within the budget whose alignment is within one
    standard error of the plain 20-step run's (training captions)."""
    fixed = [p for p in points if p.label.startswith("fixed")]
    plain = next(p for p in fixed if p.label == "fixed 20")
    tolerance = alignment_tolerance(plain)
    candidates = [p for p in points if p not in fixed and p.cost <= budget * plain.cost
                  and (p.aligned is None or p.aligned >= plain.aligned - tolerance)
                  and versus_fixed(p, fixed, "psnr") is not None]
    return max(candidates, key=lambda p: versus_fixed(p, fixed, "psnr"), default=None)


def adaptivity(point: Point, plain_points: list[float]) -> str:
    """Spread of per-image cost, and whether cheaper images lose more fidelity."""
    costs = np.array(point.costs)
    loss = np.array(plain_points) - np.array(point.psnrs)
    r = float(np.corrcoef(costs, loss)[0, 1]) if costs.std() > 0 else float("nan")
    cheap = costs <= np.median(costs)
    return (f"cost per image {costs.min():.2f}-{costs.max():.2f} (median {np.median(costs):.2f},"
            f" std {costs.std():.2f}); PSNR loss vs plain 20 steps: cheaper half "
            f"{loss[cheap].mean():.2f} dB, dearer half {loss[~cheap].mean():.2f} dB; "
            f"correlation(cost, loss) {r:+.2f}")


def same_image_cheaper(args, captions, seeds, chosen: Point, judge) -> list[str]:
    """Per-step settings against the plain run of each seed preset's sampler (held-out)."""
    all_captions = captions * len(seeds)
    lines = ["## The same image, cheaper: against the plain run of each sampler (held-out)", "",
             "Bound: worst image >= 30 dB PSNR and >= 0.95 SSIM against the plain run, no "
             "alignment loss. The fixed rows run the same sampler with fewer steps.", "",
             "| sampler, steps | setting | cost (plain) | cost % | worst PSNR | worst SSIM | "
             "aligned (plain) | within bound |", "|---|---|---|---|---|---|---|---|"]
    settings = {"chosen: " + chosen.label: chosen.overrides,
                **{label: METHODS[label] for label in SAME_IMAGE if label != chosen.label}}
    for sampler, steps in (("ddpm", 50), ("dpm_solver++", 20), ("dpm_solver++", 10)):
        base = (f"sampler.name={sampler}", f"sampler.steps={steps}")
        plain = run(engine_for(args, *base), captions, seeds)
        plain_aligned = (metrics.alignment([r.image for r in plain], all_captions)["aligned"]
                         if judge else None)
        runs = {label: (*base, *(o for o in overrides if not o.startswith("sampler.steps")))
                for label, overrides in settings.items()}
        # Fewer fixed steps at 50% and 70% of the cost: how strict the bound is without any method.
        runs.update({f"fixed {n} steps": (base[0], f"sampler.steps={n}")
                     for n in sorted({round(steps * f) for f in (0.5, 0.7)})})
        for label, overrides in runs.items():
            results = run(engine_for(args, *overrides), captions, seeds)
            p = score(label, results, plain, all_captions, judge, plain=plain)
            ok = p.plain_psnr_min >= 30 and p.plain_ssim_min >= 0.95 and (
                p.aligned is None or p.aligned >= plain_aligned)
            lines.append(
                f"| {sampler} {steps} | {label} | {p.cost:.2f} ({steps}) | "
                f"{p.cost / steps:.0%} | {p.plain_psnr_min:.1f} | {p.plain_ssim_min:.3f} | "
                f"{_fmt(p.aligned, '.1%')} ({_fmt(plain_aligned, '.1%')}) | "
                f"{'yes' if ok else 'no'} |")
            print(lines[-1], flush=True)
    return lines + [""]


def _family(label: str) -> str:
    return "shorter grid + skip" if label[0].isdigit() else label.split()[0]


def plot(panels: dict[str, list[Point]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attrs = [("psnr", "PSNR to the reference (dB)"), ("aligned", "aligned (judge)")]
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 4.6 * len(panels)), squeeze=False)
    families = {"cache": "s", "skip": "^", "guidance": "D", "replan": "x",
                "shorter grid + skip": "v"}
    for row, (title, points) in enumerate(panels.items()):
        fixed = [p for p in points if p.label.startswith("fixed")]
        for col, (attr, ylabel) in enumerate(attrs):
            ax = axes[row][col]
            if getattr(fixed[0], attr) is None:
                ax.set_visible(False)
                continue
            ax.plot([p.cost for p in fixed], [getattr(p, attr) for p in fixed], "k-o",
                    label="fixed steps")
            for family, marker in families.items():
                ours = [p for p in points if _family(p.label) == family]
                if ours:
                    ax.scatter([p.cost for p in ours], [getattr(p, attr) for p in ours],
                               marker=marker, s=45, label=family)
            ax.set_xlabel("cost per image (full-UNet equivalents, FLOP-counted)")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:shapes")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--train-captions", type=int, default=30)
    parser.add_argument("--fixed", type=int, nargs="+",
                        default=[4, 6, 8, 10, 11, 12, 14, 16, 20])
    parser.add_argument("--reference-steps", type=int, default=100)
    parser.add_argument("--budget", type=float, default=0.55,
                        help="the chosen setting's cost at most this fraction of the plain run")
    parser.add_argument("--quick", action="store_true", help="a few methods only")
    parser.add_argument("--out", type=Path, default=HERE / "frontier")
    args = parser.parse_args()

    judge = args.model.startswith("bundled:shapes")
    seeds = [1000 * (i + 1) for i in range(args.seeds)]
    train = [c for _, c, _ in dataset.examples(args.train_captions, start=10_000)]
    held_out = dataset.held_out_captions()
    methods = {k: v for k, v in METHODS.items() if not args.quick or k in QUICK}
    methods.update(replan_methods(args, train, seeds))
    panels = {
        f"{args.model}, training captions": evaluate(args, train, seeds, methods, judge),
        f"{args.model}, held-out captions": evaluate(args, held_out, seeds, methods, judge),
    }
    (train_points, held_points) = panels.values()
    chosen = choose(train_points, args.budget)
    lines = [
        f"# Adaptive compute against the fixed-step curve: {args.model}", "",
        f"DPM-Solver++ 20 steps unless a label says otherwise, guidance {args.guidance}, "
        f"{args.size}x{args.size}, seeds {seeds} (caption k of seed s uses seed s + k); "
        f"reference: {args.reference_steps} steps, same seed. Cost: UNet work per image in "
        "full-UNet equivalents, counted in FLOPs by the engine (plain 20 steps = 20). dX vs "
        "fixed: the point minus the fixed-step curve interpolated at the same cost (positive = "
        "better than fixed steps at equal cost). Labels: cache N Lk = a full UNet every N steps, "
        "the shallow branch at skip level k between; skip T xM = skip a step when the scaled "
        "extrapolation error is below T, at most M in a row; guidance every N = the "
        "unconditional half every N steps; wK = K warm-up steps always full. Regenerate with "
        "`python examples/frontier.py`.", ""]
    for title, points in panels.items():
        lines += report(title, points)
    if chosen is not None:
        held = next(p for p in held_points if p.label == chosen.label)
        fixed_held = [p for p in held_points if p.label.startswith("fixed")]
        plain20 = next(p for p in fixed_held if p.label == "fixed 20")
        fixed_train = [p for p in train_points if p.label.startswith("fixed")]
        plain_train = next(p for p in fixed_train if p.label == "fixed 20")
        lines += [
            "## The packaged setting", "",
            f"Chosen on the training captions: the best dPSNR among settings costing <= "
            f"{args.budget:.0%} of the plain 20-step run whose alignment is within one standard "
            f"error ({alignment_tolerance(plain_train):.1%}) of its: **{chosen.label}** "
            f"(`{' '.join(chosen.overrides)}`).", "",
            f"- training: cost {chosen.cost:.2f}, dPSNR "
            f"{versus_fixed(chosen, fixed_train, 'psnr'):+.2f} dB",
            f"- held-out: cost {held.cost:.2f} ({held.cost / plain20.cost:.0%} of plain 20), "
            f"PSNR {held.psnr:.2f} dB, dPSNR {_fmt(versus_fixed(held, fixed_held, 'psnr'), '+.2f')}"
            f" dB, aligned {_fmt(held.aligned, '.1%')} (plain 20: {_fmt(plain20.aligned, '.1%')}),"
            f" d aligned vs fixed {_fmt(versus_fixed(held, fixed_held, 'aligned'), '+.1%')}",
            f"- held-out adaptivity: {adaptivity(held, plain20.psnrs)}", ""]
        lines += same_image_cheaper(args, held_out, seeds, chosen, judge)
    args.out.with_suffix(".md").write_text("\n".join(lines))
    plot(panels, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
