"""PyTorch's fused CPU attention against `optimize.attention: chunked`, per call, for the
attention shapes of SD 1.5 (UNet self-attention at each level, cross-attention, the VAE's),
timed in one process in interleaved rounds.

    python examples/cpu_attention.py                 # bf16, 256x256 and 512x512 images
    python examples/cpu_attention.py --dtype fp32    # why fp32 stays with PyTorch's kernel

Each row: median ms per call over rounds for both, the median of per-round ratios, and both
outputs' relative L2 distance to fp32 SDPA. Prints markdown; nothing else should use the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sdaccel.engine.speed.chunked_attention import chunked_attention


def shapes(size: int) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> ((batch, heads, queries, head size), keys) for one guided call at `size`."""
    tokens = (size // 8) ** 2
    return {
        f"UNet self-attention, level 0 ({tokens} tokens)": ((2, 8, tokens, 40), tokens),
        f"UNet self-attention, level 1 ({tokens // 4} tokens)": ((2, 8, tokens // 4, 80),
                                                                 tokens // 4),
        "UNet cross-attention, level 0 (77 keys)": ((2, 8, tokens, 40), 77),
        f"VAE mid-block attention ({tokens} tokens)": ((1, 1, tokens, 512), tokens),
    }


def timed(call, inputs) -> float:
    started = time.perf_counter()
    call(*inputs)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"{args.dtype}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}\n")
    print("| image | attention | SDPA ms | chunked ms | speed-up (per round) | error SDPA / "
          "chunked |")
    print("|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for size in args.sizes:
        for name, ((batch, heads, queries, dim), keys) in shapes(size).items():
            q = torch.randn(batch, heads, queries, dim, generator=generator)
            k, v = (torch.randn(batch, heads, keys, dim, generator=generator) for _ in range(2))
            reference = F.scaled_dot_product_attention(q, k, v)
            inputs = [t.to(dtype) for t in (q, k, v)]
            calls = {"sdpa": F.scaled_dot_product_attention, "chunked": chunked_attention}
            times = {key: [] for key in calls}
            with torch.inference_mode():
                errors = {key: ((call(*inputs).float() - reference).norm()
                                / reference.norm()).item()
                          for key, call in calls.items()}  # also the untimed first calls
                for _ in range(args.rounds):
                    for key, call in calls.items():
                        times[key].append(timed(call, inputs))
            ratios = [a / b for a, b in zip(times["sdpa"], times["chunked"], strict=True)]
            print(f"| {size} | {name} | {statistics.median(times['sdpa']) * 1e3:.1f} | "
                  f"{statistics.median(times['chunked']) * 1e3:.1f} | "
                  f"{statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})"
                  f" | {errors['sdpa']:.1e} / {errors['chunked']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
