"""CPU threads: image time with 1, 2, ... all cores, and two sdaccel processes on one machine.

    python examples/cpu_threads.py                                   # bundled model, 64x64
    python examples/cpu_threads.py --model random:sd15 --size 256 --steps 2

Part 1 times whole images in this process at each thread count (torch.set_num_threads),
interleaved (1, 2, ..., 1, 2, ...). Part 2 starts worker processes of this script: one alone with
all cores, then two at once with all cores each (what two `sdaccel` commands do by default), then
two at once with half the cores each (OMP_NUM_THREADS). Prints markdown; nothing else should use
the CPU meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def engine_for(args):
    from sdaccel.engine.engine import Engine
    from sdaccel.settings import resolve_settings

    overrides = [f"model_id={args.model}", f"generation.height={args.size}",
                 f"generation.width={args.size}", f"sampler.steps={args.steps}"]
    return Engine(resolve_settings(args.preset, overrides=overrides).settings)


def image_seconds(engine) -> float:
    started = time.perf_counter()
    engine.generate(["a red circle on a blue background"])
    return time.perf_counter() - started


def worker(args) -> None:
    """Warm up, then time `args.images` images; print their times as JSON."""
    engine = engine_for(args)
    image_seconds(engine)
    print(json.dumps([image_seconds(engine) for _ in range(args.images)]), flush=True)


def processes(args, count: int, threads: int) -> list[float]:
    """Image times of `count` worker processes started together, `threads` threads each."""
    command = [sys.executable, __file__, "--worker", "--model", args.model, "--size",
               str(args.size), "--steps", str(args.steps), "--preset", args.preset,
               "--images", str(args.images)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    running = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
               for _ in range(count)]
    times = []
    for process in running:
        out, _ = process.communicate()
        times.extend(json.loads(out.strip().splitlines()[-1]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:shapes")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=5, help="images per worker process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    cores = os.cpu_count() or 1
    counts = sorted({1, 2, max(1, cores // 2), cores} & set(range(1, cores + 1)))
    print(f"{args.model}, {args.size}x{args.size}, {args.steps} steps, preset {args.preset}; "
          f"{cores} CPUs ({torch.backends.cpu.get_cpu_capability()})\n")
    engine = engine_for(args)
    image_seconds(engine)
    times: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(args.rounds):
        for n in counts:
            torch.set_num_threads(n)
            times[n].append(image_seconds(engine))
    print("| threads (one process) | s per image (median of rounds) |")
    print("|---|---|")
    for n in counts:
        print(f"| {n} | {statistics.median(times[n]):.2f} |")

    print("\n| processes at once | threads each | s per image (median) | worst |")
    print("|---|---|---|---|")
    for count, threads in ((1, cores), (2, cores), (2, max(1, cores // 2))):
        measured = processes(args, count, threads)
        print(f"| {count} | {threads} | {statistics.median(measured):.2f} | "
              f"{max(measured):.2f} |", flush=True)


if __name__ == "__main__":
    main()
