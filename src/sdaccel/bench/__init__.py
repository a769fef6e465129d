"""Benchmark runner and its report; also the seed's Python API `benchmark(cfg, prompts, ...)`.

Every configuration is measured beside a **baseline run in the same process**: a plain
`diffusers.StableDiffusionPipeline` built from a separately loaded fp32 copy of the same model
(fp16 on request), with the same sampler class, steps, size, guidance and seeds (one CPU
generator per image, as the engine draws them). Each row's images are compared with the
baseline's images of the same prompt and seed (PSNR/SSIM from `sdaccel.metrics`), so a speed-up
is always shown beside what it cost in fidelity. `reference="<label>"` compares every row with
that configuration instead (e.g. a few-step preset against `cpu`); a row that makes another image
by design (sampler, steps, guidance, LoRAs, decoder) says so and is not judged for drift, and
rows of the bundled model report caption alignment (`fidelity`). Peers (DeepCache, ToMe) run
on that same baseline pipeline; `equal_cost` adds fixed-step runs at each configuration's
measured cost.

All rows are loaded first and warmed up, then timed in interleaved rounds (A B C A B C ...);
a row's speed-up is the median of its per-round paired ratios to the baseline, with the 25th-75th
percentile of those ratios as its spread (`runner.py` says why and how).

Modules: `configs` (what to measure), `contestants` (engine, pipeline and peer runners),
`fidelity` (same image or not, caption alignment), `peers` (the peer packages), `flops`
(measured UNet work), `runner` (`benchmark`), `report` (Row, BenchReport). Nothing here
prints: progress goes to an `on_progress` callback.
"""

from sdaccel.bench.configs import BenchConfig, ConfigSpec, resolve_configs
from sdaccel.bench.peers import PEERS, PeerError, PeerSpec, parse_peer
from sdaccel.bench.report import (
    DEFAULT_PROMPTS,
    MIN_PSNR_DB,
    MIN_SSIM,
    PSNR_CAP_DB,
    SPREAD_PERCENTILES,
    BenchProgress,
    BenchReport,
    Row,
    paired_speedup,
)
from sdaccel.bench.runner import benchmark

__all__ = [
    "DEFAULT_PROMPTS", "MIN_PSNR_DB", "MIN_SSIM", "PEERS", "PSNR_CAP_DB", "SPREAD_PERCENTILES",
    "BenchConfig", "BenchProgress", "BenchReport", "ConfigSpec", "PeerError", "PeerSpec", "Row",
    "benchmark", "paired_speedup", "parse_peer", "resolve_configs",
]
