"""What a benchmark returns: one Row per baseline, configuration, peer and equal-cost run, and the
BenchReport that holds them (JSON, CSV, plot). No torch here."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdaccel.errors import ConfigError, writing

# The seed's three default prompts (scripts/run_benchmark.py).
DEFAULT_PROMPTS = ("a photo of a cat", "a futuristic city at sunset", "a watercolor landscape")
# Drift bounds on the worst image of a configuration against the baseline's image of the same
# prompt and seed. 30 dB / 0.95 is where differences stop being invisible side by side on SD 1.5
# (fp16 vs fp32 eager is typically above both; an int8 text encoder or a sampler change is not).
MIN_PSNR_DB = 30.0
MIN_SSIM = 0.95
PSNR_CAP_DB = 100.0  # identical images (infinite PSNR) count as this in means and files
# The speed-up's spread: this percentile range of the per-round paired ratios.
SPREAD_PERCENTILES = (25, 75)

KINDS = ("baseline", "config", "peer", "equal-cost")


@dataclass(frozen=True)
class BenchProgress:
    """One step of the run, for a front end to show: `done` of `total` calls of `phase`."""

    label: str
    phase: str  # "load" | "warm-up" | "cost" (an uncounted call that measures cost) | "timed"
    done: int
    total: int


@dataclass
class Row:
    label: str
    kind: str  # "baseline" | "config" | "peer" | "equal-cost"
    baseline: str  # label of the baseline it is compared with (itself for a baseline)
    model: str
    device: str
    sampler: str
    steps: int  # the solver's plan (an adaptive replan run: adaptive.max_steps)
    height: int
    width: int
    guidance: float
    batch: int
    precision: str
    compile: str
    passes: str  # speed passes; for a peer: the package, its version and parameters
    iters: int  # timed rounds
    warmup: int
    load_seconds: float
    first_call_seconds: float
    unet_steps_per_s: float | None
    seconds_per_image_median: float
    seconds_per_image_p90: float
    images_per_s: float
    # Its own footprint: its weights + the largest rise above resident memory during one of its
    # own calls (see BenchReport.memory_note).
    peak_memory_bytes: int
    memory_kind: str
    load_memory_bytes: int  # CUDA: what loading it allocated; CPU: its models' weight bytes
    nfe: float  # UNet evaluations per image (x2 with guidance)
    # Mean UNet work per image in full-UNet equivalents (one full guided call = 1.0).
    cost: float | None = None
    cost_source: str = ""  # "steps" (plain diffusers) | "engine" (ImageResult.cost) | "flops"
    compile_cache_entries: int = 0
    # Median over the timed rounds of (baseline s/img in round r) / (this row's s/img in round r)
    speedup: float | None = None
    speedup_p25: float | None = None  # spread: 25th and 75th percentile of those ratios
    speedup_p75: float | None = None
    psnr_db: float | None = None
    ssim: float | None = None
    psnr_min_db: float | None = None
    ssim_min: float | None = None
    drift: bool = False
    equal_cost_of: str | None = None  # equal-cost rows: the configuration whose cost it matches
    notes: str = ""  # the engine's warnings during the run (e.g. a compile fallback)


@dataclass
class BenchReport:
    rows: list[Row]
    prompts: list[str]
    iters: int
    warmup: int
    device_name: str
    versions: dict[str, str]
    min_psnr: float = MIN_PSNR_DB
    min_ssim: float = MIN_SSIM
    memory_note: str = ""
    images: dict[str, list] = field(default_factory=dict, repr=False)  # label -> PIL images

    def row(self, label: str) -> Row:
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(f"no row {label!r}; rows: {', '.join(r.label for r in self.rows)}")

    def to_dict(self) -> dict[str, Any]:
        low, high = SPREAD_PERCENTILES
        return {
            "device_name": self.device_name, "versions": self.versions,
            "prompts": self.prompts, "iters": self.iters, "warmup": self.warmup,
            "timing": {
                "order": "interleaved: round r calls every row once with the same prompt and "
                         "seed, rows in table order",
                "speedup": "median over rounds of baseline s/img / row s/img in that round",
                "spread": f"speedup_p{low}, speedup_p{high}: percentiles of those ratios",
            },
            "bounds": {"min_psnr_db": self.min_psnr, "min_ssim": self.min_ssim,
                       "psnr_cap_db": PSNR_CAP_DB},
            "memory_note": self.memory_note,
            "rows": [asdict(r) for r in self.rows],
        }

    def table(self):
        """The report as one Rich table (what `sdaccel bench` prints)."""
        return report_table(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write_csv(self, path: Path) -> Path:
        path = Path(path)
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(asdict(self.rows[0])))
                writer.writeheader()
                for row in self.rows:
                    writer.writerow(asdict(row))
        return path

    def plot(self, path: Path) -> Path:
        """Speed-up (with its spread) against fidelity (PSNR to the baseline), one point per
        row that is not a main baseline."""
        try:
            import matplotlib
        except ImportError:
            raise ConfigError("--plot needs matplotlib: pip install 'sdaccel[plot]'") from None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        colours = {"config": "tab:blue", "peer": "tab:green", "equal-cost": "tab:orange",
                   "baseline": "tab:grey"}
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in (r for r in self.rows if r.label != r.baseline):
            colour = "tab:red" if r.drift else colours.get(r.kind, "tab:blue")
            if r.speedup_p25 is not None and r.speedup_p75 is not None:
                ax.errorbar(r.psnr_db, r.speedup, yerr=[[r.speedup - r.speedup_p25],
                                                        [r.speedup_p75 - r.speedup]],
                            color=colour, fmt="o", markersize=6, capsize=3, linewidth=1)
            else:
                ax.scatter(r.psnr_db, r.speedup, color=colour, s=40)
            ax.annotate(r.label, (r.psnr_db, r.speedup), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.axvline(self.min_psnr, color="tab:red", linewidth=0.8, linestyle=":")
        ax.set_xlabel(f"PSNR to the diffusers baseline, dB (identical = {PSNR_CAP_DB:g})")
        ax.set_ylabel("speed-up vs baseline\n(median of paired per-round ratios, p25-p75)")
        ax.set_title(f"sdaccel bench on {self.device_name}: blue ours, green peers, orange "
                     "fixed steps at equal cost, red below fidelity bound", fontsize=8)
        fig.tight_layout()
        path = Path(path)
        try:
            with writing(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                fig.savefig(path, dpi=120)
        finally:
            plt.close(fig)
        return path


def _num(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _speedup(r) -> str:
    if not r.speedup:
        return "-"
    if r.speedup_p25 is None or r.speedup_p75 is None or r.label == r.baseline:
        return f"{r.speedup:.2f}x"
    return f"{r.speedup:.2f}x ({r.speedup_p25:.2f}-{r.speedup_p75:.2f})"


_FLAGS = {"baseline": "baseline", "peer": "peer", "equal-cost": "equal cost", "config": ""}


def report_table(report: BenchReport):
    """The report as one Rich table: baselines dimmed, drifting rows flagged."""
    from rich.markup import escape
    from rich.table import Table

    # Equal-cost rows differ from their configuration by their steps alone, which their label
    # says: they do not break a shared run description.
    runs = {f"{r.model} / {r.sampler} {r.steps} steps / {r.height}x{r.width} / guidance "
            f"{r.guidance:g} / batch {r.batch}" for r in report.rows if r.kind != "equal-cost"}
    shared = next(iter(runs)) if len(runs) == 1 else None
    low, high = SPREAD_PERCENTILES
    table = Table(title=f"sdaccel bench on {escape(report.device_name)}: {report.iters} timed "
                  f"rounds (every row once per round, interleaved) after {report.warmup} "
                  f"warm-up call(s), {len(report.prompts)} prompt(s)"
                  + (f"\n{escape(shared)}" if shared else ""),
                  caption=f"speed-up: median over rounds of the baseline's s/img / the row's "
                  f"s/img in the same round (p{low}-p{high} of those ratios); cost: UNet work "
                  "per image in full guided UNet calls; memory: "
                  f"{report.memory_note}; PSNR/SSIM: against the baseline's image of the same "
                  f"prompt and seed; DRIFT: worst image below {report.min_psnr:g} dB or SSIM "
                  f"{report.min_ssim:g}",
                  title_justify="left", caption_justify="left")
    columns = [("configuration", "left")] + ([] if shared else [("run", "left")]) + [
        ("precision u/v/t", "left"), ("compile, passes", "left"), ("first call s", "right"),
        ("UNet steps/s", "right"), ("s/img p50", "right"), ("p90", "right"),
        ("img/s", "right"), ("peak MiB", "right"), ("NFE", "right"), ("cost", "right"),
        (f"speed-up (p{low}-p{high})", "right"), ("PSNR dB", "right"), ("SSIM", "right"),
        ("", "left")]
    for name, justify in columns:
        table.add_column(name, justify=justify)
    for r in report.rows:
        psnr = "∞" if r.psnr_db is not None and r.psnr_db >= PSNR_CAP_DB else _num(r.psnr_db, 1)
        flag = "[bold red]DRIFT[/]" if r.drift else _FLAGS.get(r.kind, "")
        if r.drift and r.kind in ("peer", "equal-cost"):
            flag += f" {_FLAGS[r.kind]}"
        if r.compile_cache_entries:
            flag += " cache"
        run = [] if shared else [escape(f"{r.model} / {r.sampler} {r.steps} / "
                                        f"{r.height}x{r.width}")]
        table.add_row(
            escape(r.label), *run, r.precision,
            escape(r.compile + (f", {r.passes}" if r.passes else "")),
            _num(r.first_call_seconds), _num(r.unet_steps_per_s, 1),
            _num(r.seconds_per_image_median, 3), _num(r.seconds_per_image_p90, 3),
            _num(r.images_per_s), f"{r.peak_memory_bytes / 2**20:.0f}", _num(r.nfe, 0),
            _num(r.cost, 2), _speedup(r), psnr, _num(r.ssim, 4), flag.strip(),
            style="dim" if r.kind == "baseline" else None,
        )
    return table


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def paired_speedup(baseline_seconds: Sequence[float], seconds: Sequence[float]
                   ) -> tuple[float, float, float]:
    """(median, p25, p75) of the per-round ratios baseline_seconds[r] / seconds[r] (both per
    image): each round's two calls ran back to back, so a slow spell of the machine affects both
    sides of a ratio and cancels."""
    ratios = [b / s for b, s in zip(baseline_seconds, seconds, strict=True)]
    low, high = SPREAD_PERCENTILES
    return percentile(ratios, 50), percentile(ratios, low), percentile(ratios, high)
