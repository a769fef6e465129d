"""Feature caching on SD 1.5's architecture: does wall time follow the FLOP count?

On `random:sd15` (SD 1.5's UNet built from its config with random weights: the real shapes and
speed, no download), one guided UNet call (batch 2) at full depth and one shallow call at a cache
level are timed in interleaved rounds (F S F S ...) at each size and precision; the table gives
the median per-call times, the measured wall ratio and the FLOP ratio (sampling/cost.py), and what
they mean for one 20-step image of a cache setting (warm-up 3, last step full, a full call every
`--interval` steps): the speed-up of its UNet work, from the measured call times.

    python examples/cache_speed_sd15.py                       # 256 and 512, fp32 and bf16
    python examples/cache_speed_sd15.py --sizes 256 --rounds 5
A whole SD 1.5 image at 512x512 takes about 4 minutes in fp32 and 2.4 in bf16 on a 2-core CPU;
BENCHMARKS.md has whole images from `sdaccel bench -c cache.yaml --peer deepcache` beside these.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from sdaccel.engine.loading.models import load_components  # noqa: E402
from sdaccel.engine.sampling.cost import UNetCost  # noqa: E402
from sdaccel.engine.sampling.feature_cache import LayeredUNet  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def plan(steps: int, warmup: int, interval: int) -> tuple[int, int]:
    """(full calls, shallow calls) of one image under the engine's cache rule."""
    full, shallow, last_full = 0, 0, None
    for index in range(steps):
        if index < warmup or index == steps - 1 or index - last_full >= interval:
            full, last_full = full + 1, index
        else:
            shallow += 1
    return full, shallow


def measure(unet, size: int, dtype: torch.dtype, level: int, rounds: int) -> dict:
    layered = LayeredUNet(unet)
    side = size // 8
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, side, side, generator=generator).to(dtype)
    context = torch.randn(2, 77, 768, generator=generator).to(dtype)
    times = {"full": [], "shallow": []}
    with torch.inference_mode():
        _, deep = layered.full(x, 500, context, level)
        for _ in range(rounds + 1):  # the first round warms the allocator, not counted
            started = time.perf_counter()
            unet(x, 500, encoder_hidden_states=context, return_dict=False)
            full = time.perf_counter() - started
            started = time.perf_counter()
            layered.shallow(x, 500, context, level, deep)
            shallow = time.perf_counter() - started
            times["full"].append(full)
            times["shallow"].append(shallow)
    cost = UNetCost(unet, layered, (4, side, side), (77, 768), dtype)
    return {"full": statistics.median(times["full"][1:]),
            "shallow": statistics.median(times["shallow"][1:]),
            "ratios": [f / s for f, s in zip(times["full"][1:], times["shallow"][1:],
                                             strict=True)],
            "flop_fraction": cost.fraction(level)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--level", type=int, default=0)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    full_calls, shallow_calls = plan(20, 3, args.interval)
    print(f"random:sd15, guided call (batch 2), cache level {args.level}; image: 20 steps, "
          f"warm-up 3, interval {args.interval} = {full_calls} full + {shallow_calls} shallow "
          f"calls; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| size | dtype | full call s | shallow call s | wall ratio (min-max) | FLOP ratio | "
          "image UNet speed-up, wall | image, FLOPs |")
    print("|---|---|---|---|---|---|---|---|")
    base = load_components("random:sd15", device="cpu").unet.eval()
    for dtype_name in args.dtypes:
        unet = base.to(DTYPES[dtype_name])
        for size in args.sizes:
            m = measure(unet, size, DTYPES[dtype_name], args.level, args.rounds)
            wall_image = 20 * m["full"] / (full_calls * m["full"] + shallow_calls * m["shallow"])
            flop_image = 20 / (full_calls + shallow_calls * m["flop_fraction"])
            print(f"| {size} | {dtype_name} | {m['full']:.2f} | {m['shallow']:.3f} | "
                  f"{m['full'] / m['shallow']:.1f}x ({min(m['ratios']):.1f}-"
                  f"{max(m['ratios']):.1f}) | {1 / m['flop_fraction']:.1f}x | "
                  f"{wall_image:.2f}x | {flop_image:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
