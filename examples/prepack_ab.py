"""What `optimize.prepack_weights` buys per UNet step, and what it costs in memory: one engine's
UNet timed with its layers packed and unpacked in turn (A B A B ...), in one process.

    python examples/prepack_ab.py --model random:sdxl --preset sdxl-cpu --size 768

Each switch is followed by an untimed call (packing happens on a layer's first call); the
speed-up is the median of the per-round ratios. The memory is the packed copies' bytes: what
`prepack_weights: false` saves. Nothing else should use the CPU meanwhile.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from cpu_unet_step import GIB, context_shape, drop_all_but_the_unet, preset_row  # noqa: E402

from sdaccel.bench.openvino_peer import unet_inputs  # noqa: E402
from sdaccel.engine.engine import Engine  # noqa: E402
from sdaccel.engine.speed.prepack import Packed, pack_layers, unpack_layers  # noqa: E402
from sdaccel.settings import resolve_settings  # noqa: E402


def packed_bytes(unet) -> int:
    return sum(layer.packed.numel() * layer.packed.element_size() for layer in unet.modules()
               if isinstance(layer, Packed) and layer.packed is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:sd15")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cpu = Engine(resolve_settings(args.preset, overrides=[f"model_id={args.model}"]).settings)
    if "prepack_weights" not in cpu.passes:
        raise SystemExit(f"the {args.preset!r} preset does not pack weights on this machine")
    drop_all_but_the_unet(cpu)
    row = preset_row(cpu, 0.0)
    inputs = unet_inputs(cpu.unet, 2, args.size // cpu.vae_scale_factor, context_shape(cpu),
                         torch.Generator().manual_seed(0))
    inputs = (*inputs[:1], torch.tensor(500), *inputs[2:])
    times: dict[bool, list[float]] = {True: [], False: []}
    held = 0
    with torch.inference_mode():
        for _ in range(args.rounds):
            for packed in (True, False):
                (pack_layers if packed else unpack_layers)(cpu.unet)
                row.call(*inputs)  # packs (or not) on this call
                held = max(held, packed_bytes(cpu.unet))
                started = time.perf_counter()
                row.call(*inputs)
                times[packed].append(time.perf_counter() - started)
    ratios = [b / a for a, b in zip(times[True], times[False], strict=True)]
    print(f"{args.model}, `{args.preset}` preset UNet ({cpu.settings.unet_dtype}), one guided "
          f"step at {args.size}x{args.size}, {os.cpu_count()} CPUs, {args.rounds} A/B rounds\n")
    print(f"| weights | s per step (per round) |\n|---|---|\n"
          f"| packed | {statistics.median(times[True]):.2f} "
          f"({', '.join(f'{t:.2f}' for t in times[True])}) |\n"
          f"| unpacked | {statistics.median(times[False]):.2f} "
          f"({', '.join(f'{t:.2f}' for t in times[False])}) |\n")
    print(f"Packing: {statistics.median(ratios):.2f}x per step "
          f"({', '.join(f'{r:.2f}' for r in ratios)}) for {held / GIB:.2f} GiB of packed copies")


if __name__ == "__main__":
    main()
