"""Quality yardstick for the bundled ``shapes`` model: samplers x steps on held-out captions.

For each sampler (DDPM, DDIM, DPM-Solver++) and each step count, generate every held-out caption
(combinations of colour, shape and background never trained on; see
``sdaccel.shapes.dataset.held_out_captions``) with the same seed per caption, then report

- alignment: the share of images showing every attribute the caption states, read back by the
  rule-based judge (``sdaccel.metrics.alignment``), and per attribute;
- fidelity: PSNR and SSIM (``sdaccel.metrics``) to a reference made with 100 steps and the same
  seed, by DPM-Solver++ (default, ``--reference-sampler dpm_solver++``: DDIM and DPM-Solver++
  solve the same probability-flow ODE, so both converge to it; DDPM is stochastic and does not)
  or by the same sampler as the row (``--reference-sampler same``, 3x the reference cost).

``--guidance-sweep 2 4 7.5`` adds a table of the headline setting (DPM-Solver++, 20 steps) at
those guidance scales: guidance is the strongest single knob on alignment.

Generation goes through ``sdaccel.engine.Engine`` with the ``tiny`` preset (which is, by contract,
the same image as diffusers' StableDiffusionPipeline). Writes a Markdown table and a PNG plot::

    python examples/yardstick.py       # -> examples/yardstick.md, examples/yardstick.png
    python examples/yardstick.py --seeds 1 --steps 5 20 --model /path/to/diffusers/folder
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image, ImageDraw  # noqa: E402

from sdaccel import metrics  # noqa: E402
from sdaccel.shapes import dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
LABELS = {"ddpm": "DDPM", "ddim": "DDIM", "dpm_solver++": "DPM-Solver++"}
ATTRS = ["colour", "shape", "background", "count", "size", "position"]
COLOURS = {"ddpm": (214, 39, 40), "ddim": (31, 119, 180), "dpm_solver++": (44, 160, 44)}


@dataclass
class Row:
    sampler: str
    steps: int
    alignment: dict[str, float]
    psnr: float
    ssim: float
    seconds_per_image: float
    images: list[Image.Image]


def generate(
    model: str, sampler: str, steps: int, guidance: float, captions: list[str], seeds: list[int]
) -> tuple[list[Image.Image], float]:
    from sdaccel.engine.engine import Engine
    from sdaccel.settings import resolve_settings

    settings = resolve_settings(
        "tiny",
        overrides=[
            f"model_id={model}",
            f"sampler.name={sampler}",
            f"sampler.steps={steps}",
            f"generation.guidance_scale={guidance}",
        ],
        environ={},
    ).settings
    engine = Engine(settings)
    images: list[Image.Image] = []
    start = time.perf_counter()
    for seed in seeds:  # caption k gets seed `seed + k`, whatever the sampler or step count
        images += [r.image for r in engine.generate(captions, seed=seed)]
    return images, (time.perf_counter() - start) / len(images)


def _seeds(args: argparse.Namespace) -> list[int]:
    return [1000 * (i + 1) for i in range(args.seeds)]


def run(args: argparse.Namespace) -> list[Row]:
    captions, seeds = dataset.held_out_captions(), _seeds(args)
    all_captions = captions * len(seeds)
    rows: list[Row] = []
    shared = None
    if args.reference_sampler != "same":
        shared = generate(
            args.model, args.reference_sampler, args.reference_steps, args.guidance, captions, seeds
        )
    for sampler in args.samplers:
        if shared is None or sampler == args.reference_sampler:
            ref, ref_s = shared or generate(
                args.model, sampler, args.reference_steps, args.guidance, captions, seeds
            )
            step_list = [*args.steps, args.reference_steps]
        else:
            (ref, _), step_list = shared, list(args.steps)
        for steps in step_list:
            if steps == args.reference_steps:
                images, secs = ref, ref_s
            else:
                images, secs = generate(args.model, sampler, steps, args.guidance, captions, seeds)
            row = Row(
                sampler,
                steps,
                metrics.alignment(images, all_captions),
                metrics.psnr(images, ref),
                metrics.ssim(images, ref),
                secs,
                images,
            )
            rows.append(row)
            print(
                f"{LABELS[sampler]:13s} {steps:4d} steps: aligned {row.alignment['aligned']:.1%}"
                f"  PSNR {row.psnr:5.1f} dB  SSIM {row.ssim:.3f}  {secs:.3f} s/image",
                flush=True,
            )
    return rows


HEADLINE = ("dpm_solver++", 20)  # the quality bar: DPM-Solver++ at 20 steps


def guidance_sweep(args: argparse.Namespace) -> list[tuple[float, dict[str, float]]]:
    """Alignment of the headline setting at each ``--guidance-sweep`` scale (same seeds)."""
    captions, seeds = dataset.held_out_captions(), _seeds(args)
    out = []
    for g in args.guidance_sweep:
        images, _ = generate(args.model, *HEADLINE, g, captions, seeds)
        out.append((g, metrics.alignment(images, captions * len(seeds))))
        print(f"guidance {g:4.1f}: aligned {out[-1][1]['aligned']:.1%}", flush=True)
    return out


def sweep_table(sweep: list[tuple[float, dict[str, float]]]) -> str:
    lines = [
        "",
        f"## Guidance scale ({LABELS[HEADLINE[0]]}, {HEADLINE[1]} steps, same images otherwise)",
        "",
        "| guidance | aligned | " + " | ".join(ATTRS) + " |",
        "|---:|---:|" + "---:|" * len(ATTRS),
    ]
    for g, acc in sweep:
        cells = " | ".join(_pct(acc.get(a)) for a in ATTRS)
        lines.append(f"| {g:g} | **{_pct(acc['aligned'])}** | {cells} |")
    return "\n".join(lines) + "\n"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def table(rows: list[Row], args: argparse.Namespace, n_images: int) -> str:
    lines = [
        "# Yardstick: bundled `shapes` model, held-out captions",
        "",
        f"{n_images} images per row: the {len(dataset.held_out_captions())} held-out captions "
        f"x {args.seeds} seed(s); guidance {args.guidance}; 64x64; CPU, fp32. "
        f"Fidelity (PSNR, SSIM) is to {args.reference_steps} steps of "
        + (
            "the same sampler"
            if args.reference_sampler == "same"
            else LABELS[args.reference_sampler]
        )
        + " with the same seed (the reference row is therefore inf / 1.000). *Aligned* = every "
        "attribute the "
        "caption states is read back correctly by `sdaccel.shapes.judge`.",
        "",
        "Generated by `python examples/yardstick.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in _cli_args(args).items())
        + "`.",
        "",
        "| sampler | steps | aligned | " + " | ".join(ATTRS) + " | PSNR (dB) | SSIM | s/image |",
        "|---|---:|---:|" + "---:|" * len(ATTRS) + "---:|---:|---:|",
    ]
    for r in rows:
        cells = [_pct(r.alignment.get(a)) for a in ATTRS]
        lines.append(
            f"| {LABELS[r.sampler]} | {r.steps} | **{_pct(r.alignment['aligned'])}** | "
            + " | ".join(cells)
            + f" | {r.psnr:.1f} | {r.ssim:.3f} | {r.seconds_per_image:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _cli_args(args: argparse.Namespace) -> dict[str, str]:
    return {
        "model": args.model,
        "guidance": str(args.guidance),
        "seeds": str(args.seeds),
        "steps": " ".join(map(str, args.steps)),
        "reference_steps": str(args.reference_steps),
        "reference_sampler": args.reference_sampler,
        **(
            {"guidance_sweep": " ".join(map(str, args.guidance_sweep))}
            if args.guidance_sweep
            else {}
        ),
    }


def plot(rows: list[Row], args: argparse.Namespace, path: Path) -> None:
    """Two line panels (alignment, PSNR vs steps) and a strip of DPM-Solver++ samples (PIL only)."""
    w, h, pad = 420, 300, 50
    steps_axis = [*args.steps, args.reference_steps]
    samples = [r for r in rows if r.sampler == args.samplers[-1] and r.steps == 20] or rows[-1:]
    strip = samples[0].images[: len(dataset.held_out_captions())]
    cols = 12
    strip_rows = (len(strip) + cols - 1) // cols
    canvas = Image.new("RGB", (2 * w + 3 * pad, h + 2 * pad + strip_rows * 70 + 30), "white")
    d = ImageDraw.Draw(canvas)
    finite = [r.psnr for r in rows if r.psnr != float("inf")]
    psnr_max = max(finite + [10.0]) * 1.1
    panels = [
        ("aligned (held-out captions)", lambda r: r.alignment["aligned"], 1.0, "{:.0%}"),
        (
            f"PSNR to {args.reference_steps}-step reference (dB)",
            lambda r: r.psnr,
            psnr_max,
            "{:.0f}",
        ),
    ]
    for p, (title, value, vmax, fmt) in enumerate(panels):
        x0, y0 = pad + p * (w + pad), pad
        d.rectangle((x0, y0, x0 + w, y0 + h), outline="black")
        d.text((x0, y0 - 20), title, fill="black")
        for k in range(5):
            v = vmax * k / 4
            y = y0 + h - h * k / 4
            d.line((x0, y, x0 + w, y), fill=(225, 225, 225))
            d.text((x0 - 40, y - 5), fmt.format(v), fill="black")
        xs = {s: x0 + 20 + (w - 40) * i / (len(steps_axis) - 1) for i, s in enumerate(steps_axis)}
        for s, x in xs.items():
            d.text((x - 8, y0 + h + 5), str(s), fill="black")
        d.text((x0 + w // 2 - 15, y0 + h + 20), "steps", fill="black")
        for k, sampler in enumerate(args.samplers):
            pts = []
            for r in rows:
                v = value(r)
                if r.sampler == sampler and v != float("inf"):
                    pts.append((xs[r.steps], y0 + h - h * min(v, vmax) / vmax))
            if len(pts) > 1:
                d.line(pts, fill=COLOURS[sampler], width=2)
            for x, y in pts:
                d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=COLOURS[sampler])
            d.text((x0 + 10, y0 + 8 + 14 * k), LABELS[sampler], fill=COLOURS[sampler])
    y_strip = pad + h + 45
    d.text(
        (pad, y_strip - 15),
        f"{LABELS[samples[0].sampler]}, {samples[0].steps} steps, held-out captions (first seed)",
        fill="black",
    )
    for i, img in enumerate(strip):
        canvas.paste(img, (pad + (i % cols) * 68, y_strip + (i // cols) * 70))
    canvas.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bundled:shapes")
    p.add_argument("--samplers", nargs="+", default=list(LABELS), choices=list(LABELS))
    p.add_argument("--steps", nargs="+", type=int, default=[5, 10, 20, 50])
    p.add_argument("--reference-steps", type=int, default=100)
    p.add_argument("--reference-sampler", default="dpm_solver++", choices=[*LABELS, "same"])
    p.add_argument("--guidance", type=float, help="default: the tiny preset's guidance scale")
    p.add_argument("--seeds", type=int, default=2, help="seeds per caption")
    p.add_argument("--guidance-sweep", nargs="*", type=float, default=[], metavar="G")
    p.add_argument("--md", type=Path, default=HERE / "yardstick.md")
    p.add_argument("--png", type=Path, default=HERE / "yardstick.png")
    args = p.parse_args()
    if args.guidance is None:
        from sdaccel.settings import resolve_settings

        args.guidance = resolve_settings("tiny", environ={}).settings.generation.guidance_scale
    rows = run(args)
    n_images = len(dataset.held_out_captions()) * args.seeds
    sweep = sweep_table(guidance_sweep(args)) if args.guidance_sweep else ""
    args.md.write_text(table(rows, args, n_images) + sweep)
    plot(rows, args, args.png)
    print(f"wrote {args.md} and {args.png}")


if __name__ == "__main__":
    main()
