"""`sdaccel serve` under load, on loopback: throughput with batching on and off, latency, time to
the first image, and a long run that checks nothing is lost and memory stays flat.

    python examples/serve_load.py                        # bundled model, 64x64, 20 steps
    python examples/serve_load.py --model random:sd15 --size 256 --clients 1 4 --requests 8

Servers with batching on (--max-batch 8) and off (--max-batch 1) run in this process on two
ports and are measured in alternating rounds (on, off, on, off ...), so both see the same machine.
Prints markdown tables; no other process should use the CPU meanwhile.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from sdaccel.serve.app import Limits, create_app  # noqa: E402
from sdaccel.settings import resolve_settings  # noqa: E402


def start(settings, port: int, max_batch: int, max_wait_ms: int, max_queue: int = 512) -> None:
    limits = Limits(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
    app = create_app(settings, limits)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)


def body(args, k: int) -> dict:
    return {"prompt": ["a red circle", "two blue squares", "a small green star"][k % 3],
            "seed": 1000 + k, "steps": args.steps, "width": args.size, "height": args.size,
            "cfg_scale": 4.0, "sampler_name": "DPM++ 2M"}


def burst(args, port: int, clients: int) -> tuple[float, list[float], list[int]]:
    """`args.requests` requests from `clients` concurrent clients: (images/s, latencies,
    status codes)."""
    def one(k: int) -> tuple[float, int]:
        started = time.perf_counter()
        response = httpx.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json=body(args, k),
                              timeout=600)
        return time.perf_counter() - started, response.status_code

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(args.requests)))
    elapsed = time.perf_counter() - started
    return args.requests / elapsed, [r[0] for r in results], [r[1] for r in results]


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled:shapes")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-wait-ms", type=int, default=Limits().max_wait_ms,
                        help="the servers' --max-wait-ms (default: sdaccel serve's)")
    parser.add_argument("--soak", type=int, default=1000,
                        help="requests of the long run (0: no long run, no overload burst)")
    args = parser.parse_args()

    settings = resolve_settings("tiny", overrides=[f"model_id={args.model}"]).settings
    start(settings, 7861, max_batch=8, max_wait_ms=args.max_wait_ms)
    start(settings, 7862, max_batch=1, max_wait_ms=args.max_wait_ms)
    start(settings, 7863, max_batch=8, max_wait_ms=args.max_wait_ms, max_queue=8)  # overload
    print(f"{args.model}, {args.size}x{args.size}, DPM-Solver++ {args.steps} steps, "
          f"{args.requests} requests per burst, {args.rounds} rounds, max wait "
          f"{args.max_wait_ms} ms, "
          f"{os.cpu_count()} CPUs, torch threads {__import__('torch').get_num_threads()}\n")

    # Time to the first image: a running server vs a cold `sdaccel generate` process.
    started = time.perf_counter()
    httpx.post("http://127.0.0.1:7861/sdapi/v1/txt2img", json=body(args, 0), timeout=600)
    warm = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sdaccel", "generate", "a red circle", "--model",
                    args.model, "--steps", str(args.steps), "--height", str(args.size),
                    "--width", str(args.size), "--out-dir", "/tmp/sdaccel-serve-load"],
                   check=True, capture_output=True)
    cold = time.perf_counter() - started
    print(f"first image: running server {warm:.2f} s, cold `sdaccel generate` {cold:.2f} s\n")

    print("| clients | batching | images/s (per round) | p50 s | p95 s | statuses |")
    print("|---|---|---|---|---|---|")
    for clients in args.clients:
        measured: dict[str, list] = {"on": [], "off": []}
        for _ in range(args.rounds):
            for name, port in (("on", 7861), ("off", 7862)):
                measured[name].append(burst(args, port, clients))
        for name in ("on", "off"):
            rates = [m[0] for m in measured[name]]
            latencies = [t for m in measured[name] for t in m[1]]
            statuses = sorted({s for m in measured[name] for s in m[2]})
            print(f"| {clients} | {name} | {statistics.median(rates):.3g} "
                  f"({', '.join(f'{r:.3g}' for r in rates)}) | {statistics.median(latencies):.2f}"
                  f" | {p95(latencies):.2f} | {statuses} |", flush=True)

    if args.soak:
        soak_and_overload(args)


def soak_and_overload(args) -> None:
    """The long run: every request answered once, only 200/503, memory flat; then a burst
    far beyond the queue."""
    soak = argparse.Namespace(**{**vars(args), "requests": args.soak, "steps": 2})
    before = rss_mib()
    rate, latencies, statuses = burst(soak, 7861, 16)
    after = rss_mib()
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    print(f"\nlong run: {len(statuses)} of {args.soak} requests answered {counts}, "
          f"{rate:.1f} requests/s, p95 {p95(latencies):.2f} s; RSS {before:.0f} -> "
          f"{after:.0f} MiB")
    overload = argparse.Namespace(**{**vars(args), "requests": 128, "steps": 2})
    _, _, statuses = burst(overload, 7863, 64)
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    print(f"overload: 128 requests from 64 clients at a queue of 8 images: {counts}")


if __name__ == "__main__":
    main()
