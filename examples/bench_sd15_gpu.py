"""Benchmark the real SD 1.5 architecture on a CUDA GPU: one command, one table, under 8 minutes.

    python examples/bench_sd15_gpu.py                   # 20 and 50 steps, 5 timed + 2 warm-up
    python examples/bench_sd15_gpu.py --steps 20 --iters 10 --json sd15.json --csv sd15.csv

Model `random:sd15`: SD 1.5's UNet (859.5M parameters), VAE and CLIP text encoder built from
the configs shipped in sdaccel with random weights (seeded), so no download is needed and the
speed is that of the real architecture. Images are noise; fidelity columns still compare every
configuration with the diffusers fp32 image of the same seed (a random model amplifies
differences, so PSNR here is a lower bound of what a trained model shows).

512x512, batch 1, guidance 7.5 (two UNet evaluations per step), DPM-Solver++, the seed's three
prompts. Rows, per step count:

  diffusers fp32 / fp16    plain StableDiffusionPipeline, eager (the baselines; fp32 is the
                           reference for speed-up and fidelity)
  fp32 eager               our loop, everything fp32 (fp32-ddpm50 preset)
  fp16 eager               our loop, fp16 UNet/VAE/text encoder
  fp16 + passes            fp16, channels_last, fused QKV
  mix-bf16-int8            the seed's mixed preset (bf16 UNet/VAE, int8 text encoder)
  mix-bf16-int8-compile    the same plus torch.compile reduce-overhead (CUDA graphs)
  fp16 compiled            fp16 + passes + torch.compile reduce-overhead (CUDA graphs) with
                           diffusers' inductor flags; compiled once, reused at 50 steps

"UNet steps/s" is the denoising loop alone (first to last step, synchronised), the figure
stable-fast publishes (about 105 it/s for SD 1.5 on an H100). Compiled configurations load a
matching `sdaccel compile-cache` entry when there is one (see "first call s").
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def configs(
    steps: int,
    skip_compile: bool,
    model: str = "random:sd15",
    device: str = "cuda",
    size: int = 512,
) -> list:
    from sdaccel.settings import resolve_settings

    common = [
        f"model_id={model}",
        f"device={device}",
        f"sampler.steps={steps}",
        "sampler.name=dpm_solver++",
        "adaptive.enabled=false",
        f"generation.height={size}",
        f"generation.width={size}",
        "generation.guidance_scale=7.5",
        "generation.num_images_per_prompt=1",
    ]
    fp16 = ["unet_dtype=fp16", "vae_dtype=fp16", "text_encoder_dtype=fp16"]
    passes = ["optimize.channels_last=true", "optimize.fuse_qkv=true"]
    compiled = [
        "compile.enabled=true",
        "compile.mode=reduce-overhead",
        "optimize.inductor_flags=true",
    ]
    table = [
        ("fp32 eager", "fp32-ddpm50", []),
        ("fp16 eager", "fp32-ddpm50", fp16),
        ("fp16 + passes", "fp32-ddpm50", fp16 + passes),
        ("mix-bf16-int8", "mix-bf16-int8", []),
    ]
    if not skip_compile:
        table += [
            ("mix-bf16-int8-compile", "mix-bf16-int8-compile", []),
            ("fp16 compiled", "fp32-ddpm50", fp16 + passes + compiled),
        ]
    return [
        (
            f"{label} @{steps}",
            resolve_settings(preset, overrides=common + extra, environ={}).settings,
        )
        for label, preset, extra in table
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--skip-compile",
        action="store_true",
        help="leave out the torch.compile rows (they take most of the time)",
    )
    parser.add_argument("--json", help="also write the report as JSON to this file")
    # For a dry run of this script on a machine without a GPU (not a measurement):
    #   --device cpu --model random:tiny --size 32 --steps 2 --iters 1 --warmup 0 --skip-compile
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="random:sd15", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--csv", help="also write the rows as CSV to this file")
    args = parser.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "This benchmark needs a CUDA GPU (torch.cuda.is_available() is False).", file=sys.stderr
        )
        return 4
    from rich.console import Console

    from sdaccel.bench import BenchReport, benchmark
    from sdaccel.cli.bench import report_table
    from sdaccel.cli.command import quiet_library_logs

    quiet_library_logs()
    console = Console(stderr=True)
    started = time.perf_counter()

    def progress(p) -> None:
        if p.phase != "timed" or p.done == p.total:
            console.print(
                f"[dim]{time.perf_counter() - started:6.0f} s  {p.label}: {p.phase} "
                f"{p.done}/{p.total}[/]",
                highlight=False,
            )

    reports = [
        benchmark(
            configs(steps, args.skip_compile, args.model, args.device, args.size),
            None,
            args.iters,
            args.warmup,
            also_baselines=["fp16"],
            on_progress=progress,
        )
        for steps in args.steps
    ]
    for report, steps in zip(reports, args.steps, strict=True):
        for row in report.rows:
            row.baseline = f"{row.baseline} @{steps}"
            if row.kind == "baseline":
                row.label = f"{row.label} @{steps}"
    merged = BenchReport(
        rows=[row for report in reports for row in report.rows],
        prompts=reports[0].prompts,
        iters=args.iters,
        warmup=args.warmup,
        device_name=reports[0].device_name,
        versions=reports[0].versions,
        memory_note=reports[0].memory_note,
    )
    Console(width=240).print(report_table(merged))
    best = max((r for r in merged.rows if r.unet_steps_per_s), key=lambda r: r.unet_steps_per_s)
    print(
        f"\nfastest UNet loop: {best.label}: {best.unet_steps_per_s:.1f} steps/s "
        f"(published bar for SD 1.5 on an H100, stable-fast: ~105 it/s); "
        f"total {time.perf_counter() - started:.0f} s; torch {merged.versions['torch']}, "
        f"diffusers {merged.versions['diffusers']}"
    )
    for message, labels in merged.warnings().items():
        print(f"warning: {', '.join(labels)}: {message}")
    for row in merged.rows:
        if row.notes:
            print(f"note: {row.label}: {row.notes}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(merged.to_dict(), handle, indent=2)
    if args.csv:
        merged.write_csv(args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
