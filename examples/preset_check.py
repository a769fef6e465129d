"""Does the packaged adaptive setting hold on seeds and captions it was not chosen on?

`examples/frontier.py` picks `tiny-fast`'s setting on training captions with seeds 1000 and 2000.
This script checks the preset as shipped (read from the preset file) on seeds it never saw,
3000-7000 by default, for two caption sets: the held-out captions, and fresh captions of the
training grammar (data-set items from 50,000 on, which neither training nor frontier.py used).
Each is held against the issue-12 bar: cost <= 55% of the plain 20-step run (`tiny`), >= +1 dB
PSNR to the 100-step reference over the fixed-step curve at equal cost, alignment within one point
of the plain run and no lower than fixed steps at that cost.

Alignment is also compared image by image with the plain run (aligned there and not here:
"lost"; the reverse: "won"), with a 95% interval for the difference and a two-sided sign test:
on 180 images one image is 0.6 points, and the unpaired rates of neighbouring fixed-step counts
move by several points.

Last, the paired comparison alone on many more seeds (--paired-seeds, 20 by default: 720
images), which measures the difference to about +-1.6 points.

    python examples/preset_check.py                   # ~25 min on 2 cores
    python examples/preset_check.py --preset tiny-fast --seeds 3000 4000
Writes examples/preset_check.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import frontier

from sdaccel.engine.engine import Engine
from sdaccel.settings import resolve_settings
from sdaccel.shapes import dataset, judge

HERE = Path(__file__).resolve().parent
FIXED = (8, 10, 11, 12, 14, 16, 20)
FRESH_CAPTIONS = 50_000  # first data-set index of the fresh captions


def sign_test(lost: int, won: int) -> float:
    """Two-sided p-value that images are as likely to be lost as won."""
    n = lost + won
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(lost, won) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_interval(lost: int, won: int, n: int) -> tuple[float, float]:
    """95% normal interval of the paired difference in aligned rate, (won - lost) / n."""
    d = (won - lost) / n
    half = 1.96 * math.sqrt(max((lost + won) / n - d * d, 0.0) / n)
    return d - half, d + half


def aligned_each(results, captions: list[str]) -> list[bool]:
    return [judge.score(r.image, c).aligned for r, c in zip(results, captions, strict=True)]


def image_by_image(plain: list[bool], ours: list[bool]) -> tuple[float, str]:
    """The paired difference in aligned rate against the plain run, and a line saying it:
    images lost (aligned there, not here) and won, a 95% interval and a sign test."""
    pairs = list(zip(plain, ours, strict=True))
    lost = sum(before and not after for before, after in pairs)
    won = sum(after and not before for before, after in pairs)
    difference = (won - lost) / len(pairs)
    low, high = paired_interval(lost, won, len(pairs))
    return difference, (f"{lost} lost, {won} won ({difference:+.1%}, 95% interval {low:+.1%} "
                        f"to {high:+.1%}; sign test p = {sign_test(lost, won):.2f})")


def check(args, title: str, captions: list[str]) -> list[str]:
    all_captions = captions * len(args.seeds)
    reference = frontier.run(frontier.engine_for(args, "sampler.steps=100"), captions,
                             args.seeds)
    fixed, runs = [], {}
    for steps in FIXED:
        runs[steps] = frontier.run(frontier.engine_for(args, f"sampler.steps={steps}"),
                                   captions, args.seeds)
        fixed.append(frontier.score(f"fixed {steps}", runs[steps], reference, all_captions,
                                    True))
    preset = Engine(resolve_settings(args.preset, environ={}).settings)
    results = frontier.run(preset, captions, args.seeds)
    point = frontier.score(args.preset, results, reference, all_captions, True,
                           plain=runs[20])
    plain = fixed[-1]
    _, paired = image_by_image(aligned_each(runs[20], all_captions),
                               aligned_each(results, all_captions))
    d_psnr = frontier.versus_fixed(point, fixed, "psnr")
    d_aligned = frontier.versus_fixed(point, fixed, "aligned")
    cost_share = point.cost / plain.cost
    lines = [f"## {title} ({len(results)} images per row)", "",
             "| run | cost | PSNR to 100 steps | aligned |", "|---|---|---|---|"]
    lines += [f"| {p.label} | {p.cost:.2f} | {p.psnr:.2f} | {p.aligned:.1%} |"
              for p in (*fixed, point)]
    lines += [
        "", f"- cost: {point.cost:.2f} per image, {cost_share:.1%} of the plain run (bar <= 55%):"
        f" {_verdict(cost_share <= 0.55)}; per image {min(point.costs):.0f}-"
        f"{max(point.costs):.0f}, std {statistics.pstdev(point.costs):.2f}",
        f"- PSNR over the fixed-step curve at equal cost: {d_psnr:+.2f} dB (bar >= +1): "
        f"{_verdict(d_psnr >= 1)}",
        f"- aligned: {point.aligned:.1%}, plain run {plain.aligned:.1%} "
        f"({point.aligned - plain.aligned:+.1%}, bar within 1 point: "
        f"{_verdict(point.aligned >= plain.aligned - 0.01)}); against the plain run image by "
        f"image: {paired}",
        f"- aligned against fixed steps at equal cost: {d_aligned:+.1%} (bar >= 0): "
        f"{_verdict(d_aligned >= 0)}",
        f"- the same image as the plain run: worst {point.plain_psnr_min:.1f} dB / SSIM "
        f"{point.plain_ssim_min:.3f}", ""]
    print("\n".join(lines), flush=True)
    return lines


def paired_only(args, captions: list[str]) -> list[str]:
    """The preset against the plain run, image by image, on many seeds."""
    seeds = [10_000 * (i + 1) for i in range(args.paired_seeds)]
    all_captions = captions * len(seeds)
    plain = frontier.run(frontier.engine_for(args, "sampler.steps=20"), captions, seeds)
    preset = Engine(resolve_settings(args.preset, environ={}).settings)
    results = frontier.run(preset, captions, seeds)
    plain_aligned, aligned = aligned_each(plain, all_captions), aligned_each(results, all_captions)
    difference, paired = image_by_image(plain_aligned, aligned)
    lines = [f"## Held-out captions, image by image, seeds {seeds[0]}-{seeds[-1]} "
             f"(step {seeds[0]}; {len(results)} images)", "",
             f"- cost {statistics.fmean(r.cost for r in results):.2f} per image; aligned "
             f"{statistics.fmean(aligned):.1%}, plain run {statistics.fmean(plain_aligned):.1%}",
             f"- {paired}; within one point of the plain run: "
             f"{_verdict(difference >= -0.01)}", ""]
    print("\n".join(lines), flush=True)
    return lines


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-fast")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3000, 4000, 5000, 6000, 7000])
    parser.add_argument("--paired-seeds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=HERE / "preset_check.md")
    args = parser.parse_args()
    args.model, args.size, args.guidance = "bundled:shapes", 64, 4.0  # frontier.engine_for's

    fresh = [c for _, c, _ in dataset.examples(len(dataset.held_out_captions()),
                                               start=FRESH_CAPTIONS)]
    lines = [f"# `{args.preset}` on seeds and captions it was not chosen on", "",
             f"Seeds {args.seeds} (caption k of seed s uses seed s + k; frontier.py chose on "
             "1000 and 2000), 64x64, guidance 4, DPM-Solver++; plain run: 20 steps; fixed-step "
             "curve: "
             f"{', '.join(map(str, FIXED))} steps; reference: 100 steps. Regenerate with "
             "`python examples/preset_check.py`.", ""]
    lines += check(args, "Held-out captions", dataset.held_out_captions())
    lines += check(args, f"Fresh training-grammar captions (items {FRESH_CAPTIONS}+)", fresh)
    if args.paired_seeds:
        lines += paired_only(args, dataset.held_out_captions())
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
