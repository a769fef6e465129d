"""One guided SD 1.5 UNet step on the CPU: PyTorch eager, the `cpu` preset's UNet and OpenVINO,
timed in one process in interleaved rounds.

    python examples/cpu_unet_step.py                       # random:sd15, 256 and 512
    python examples/cpu_unet_step.py --sizes 256 --rounds 3
    python examples/cpu_unet_step.py --set unet_dtype=fp32   # the preset's fp32 path

Rows: eager fp32 (the reference: the preset's UNet with its passes undone), eager bf16 (only where
the CPU has native bf16), the `cpu` preset's UNet (precision `auto` and the preset's passes, built
by the engine as `sdaccel generate --preset cpu` builds it, with any `--set` overrides), OpenVINO
at its default precision (only where the CPU has native bf16; elsewhere that is f32) and at f32
(bench's `--peer openvino` conversion). Each row's time is the median over rounds; the speed-up
is the median of per-round ratios to eager fp32; the error is the UNet output's relative L2
distance to eager fp32's; last, the preset's time over OpenVINO's (at the preset's precision: f32
for an fp32 preset) per round. The preset's `reuse_freed_memory` holds for the whole process, so
every row runs with it. Prints markdown; nothing else should use the CPU meanwhile.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from sdaccel.bench.openvino_peer import convert_unet, openvino_config  # noqa: E402
from sdaccel.engine.engine import Engine  # noqa: E402
from sdaccel.engine.loading.precision import cpu_bf16_support  # noqa: E402
from sdaccel.engine.speed.prepack import unpack_layers  # noqa: E402
from sdaccel.settings import resolve_settings  # noqa: E402


def context_shape(engine) -> tuple[int, int]:
    """(tokens, width) of the text embeddings the UNet reads."""
    return engine.tokenizer.model_max_length, engine.text_encoder.config.hidden_size


def plain_copy(unet):
    """An fp32 copy of the preset's UNet with its passes undone: the eager reference."""
    fp32 = copy.deepcopy(unet).float().to(memory_format=torch.contiguous_format)
    unpack_layers(fp32)
    if any(getattr(m, "fused_projections", False) for m in fp32.modules()):
        fp32.unfuse_qkv_projections()
    return fp32


def rows_for(args) -> dict:
    """name -> (callable(sample, t, context) -> noise, setup seconds)."""
    started = time.perf_counter()
    overrides = [f"model_id={args.model}", *args.set]
    cpu = Engine(resolve_settings("cpu", overrides=overrides).settings)
    built = time.perf_counter() - started
    fp32 = plain_copy(cpu.unet)
    rows = {"eager fp32": (lambda x, t, c: fp32(x, t, c).sample, 0.0)}
    if cpu_bf16_support():
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        rows["eager bf16"] = (lambda x, t, c: bf16(x.bfloat16(), t, c.bfloat16()).sample.float(),
                              0.0)
    passes = ", ".join(cpu.passes) + ", compiled" * cpu.settings.compile.enabled
    rows[f"`cpu` preset ({cpu.settings.unet_dtype}, {passes})"] = (
        lambda x, t, c: cpu.unet_forward(x.to(cpu.unet_dtype), t,
                                         c.to(cpu.unet_dtype)).sample.float(), built)
    # Without native bf16 OpenVINO's default precision is f32 on x86: one row, not two identical
    # models (each holds its own weights and buffers: two overran 24 GiB at 512x512).
    for precision in ("default", "f32") if cpu_bf16_support() else ("f32",):
        started = time.perf_counter()
        converted = convert_unet(fp32, context_shape(cpu), openvino_config(precision))
        rows[f"OpenVINO {precision}"] = (
            lambda x, t, c, m=converted: m(x, t, c), time.perf_counter() - started)
    return rows, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:sd15")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a settings override for the `cpu` preset row (repeatable)")
    args = parser.parse_args()
    rows, cpu = rows_for(args)
    print(f"{args.model}, one guided UNet step (batch 2); {os.cpu_count()} CPUs "
          f"({torch.backends.cpu.get_cpu_capability()}, native bf16: "
          f"{cpu_bf16_support() or 'none'}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; `cpu` preset UNet: {cpu.settings.unet_dtype} "
          f"({cpu.precisions['unet_dtype'].reason})\n")
    generator = torch.Generator().manual_seed(0)
    for size in args.sizes:
        latent = size // cpu.vae_scale_factor
        x = torch.randn(2, cpu.unet.config.in_channels, latent, latent, generator=generator)
        t = torch.tensor(500)
        c = torch.randn(2, *context_shape(cpu), generator=generator)
        outputs, first, times = {}, {}, {name: [] for name in rows}
        with torch.inference_mode():
            for name, (call, _) in rows.items():  # the first call compiles / builds
                started = time.perf_counter()
                outputs[name] = call(x, t, c)
                first[name] = time.perf_counter() - started
            for _ in range(args.rounds):
                for name, (call, _) in rows.items():
                    started = time.perf_counter()
                    call(x, t, c)
                    times[name].append(time.perf_counter() - started)
        reference = outputs["eager fp32"]
        print(f"### {size}x{size}\n")
        print("| row | s per step | speed-up vs eager fp32 (per round) | first call s | "
              "setup s | rel. error |")
        print("|---|---|---|---|---|---|")
        for name in rows:
            ratios = [a / b for a, b in zip(times["eager fp32"], times[name], strict=True)]
            error = ((outputs[name] - reference).norm() / reference.norm()).item()
            print(f"| {name} | {statistics.median(times[name]):.2f} | "
                  f"{statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})"
                  f" | {first[name]:.1f} | {rows[name][1]:.1f} | {error:.2e} |", flush=True)
        preset = next(name for name in rows if name.startswith("`cpu` preset"))
        # OpenVINO at the preset's precision ("default" is bf16 where that row exists)
        bf16_peer = cpu.settings.unet_dtype != "fp32" and "OpenVINO default" in rows
        peer = "OpenVINO default" if bf16_peer else "OpenVINO f32"
        ratios = [a / b for a, b in zip(times[preset], times[peer], strict=True)]
        print(f"\nThe `cpu` preset's time over {peer}'s: "
              f"{statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})\n")


if __name__ == "__main__":
    main()
