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
    # Label of the row it is compared with: its group's main baseline, or the `reference` row
    # when the run names one (itself for that row).
    baseline: str
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
    # Median over the timed rounds of (its baseline's s/img in round r) / (its s/img in round r)
    speedup: float | None = None
    speedup_p25: float | None = None  # spread: 25th and 75th percentile of those ratios
    speedup_p75: float | None = None
    psnr_db: float | None = None
    ssim: float | None = None
    psnr_min_db: float | None = None
    ssim_min: float | None = None
    drift: bool = False  # judged only where same_image
    # Whether the row is meant to make the picture of the row it is compared with (the same
    # model, seed, sampler, steps, guidance, LoRAs, decoder...): only then does PSNR measure its
    # quality. compared_with: "same image", or "different image: " and what differs ("4 ddim
    # steps vs 20 dpm_solver++; guidance 1 vs 7.5"); "" for the row everything is compared with.
    same_image: bool = True
    compared_with: str = ""
    # bundled:shapes: the share of its timed images in which the shapes judge reads every
    # attribute of the caption back (None: another model, or prompts that are not captions).
    alignment: float | None = None
    equal_cost_of: str | None = None  # equal-cost rows: the configuration whose cost it matches
    notes: str = ""  # the bench's remarks on the row (e.g. how its baseline reads the prompts)
    # Its engine's warnings during the run (e.g. a compile fallback), each once; the run's
    # (BenchReport.warnings) say each once for every row that had it.
    warnings: list[str] = field(default_factory=list)


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
    reference: str | None = None  # the row every other row is compared with, when named
    images: dict[str, list] = field(default_factory=dict, repr=False)  # label -> PIL images

    def row(self, label: str) -> Row:
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(f"no row {label!r}; rows: {', '.join(r.label for r in self.rows)}")

    def warnings(self) -> dict[str, list[str]]:
        """Each engine warning of the run, once, with the labels of the rows that had it (in
        table order): configurations of one model repeat the same warnings."""
        out: dict[str, list[str]] = {}
        for row in self.rows:
            for message in row.warnings:
                out.setdefault(message, []).append(row.label)
        return out

    def to_dict(self) -> dict[str, Any]:
        low, high = SPREAD_PERCENTILES
        return {
            "device_name": self.device_name, "versions": self.versions,
            "prompts": self.prompts, "iters": self.iters, "warmup": self.warmup,
            "reference": self.reference,
            "timing": {
                "order": "interleaved: round r calls every row once with the same prompt and "
                         "seed, rows in table order",
                "speedup": f"median over rounds of {self._compared_with()} s/img / row s/img "
                           "in that round",
                "spread": f"speedup_p{low}, speedup_p{high}: percentiles of those ratios",
            },
            "bounds": {"min_psnr_db": self.min_psnr, "min_ssim": self.min_ssim,
                       "psnr_cap_db": PSNR_CAP_DB},
            "memory_note": self.memory_note,
            "warnings": [{"message": message, "rows": labels}
                         for message, labels in self.warnings().items()],
            "rows": [asdict(r) for r in self.rows],
        }

    def _compared_with(self) -> str:
        return f"the reference row's ({self.reference})" if self.reference else \
            "the row's baseline's"

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
                for row in self.rows:  # a list as one cell, as notes are
                    writer.writerow({key: "; ".join(value) if isinstance(value, list) else value
                                     for key, value in asdict(row).items()})
        return path

    def plot(self, path: Path) -> Path:
        """Speed-up (with its spread) against fidelity (PSNR to the baseline or reference), one
        point per row that is not its own reference; hollow: a different image by design."""
        try:
            import matplotlib
        except ImportError:
            raise ConfigError("--plot needs matplotlib: pip install 'sdaccel[plot]'") from None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        colours = {"config": "tab:blue", "peer": "tab:green", "equal-cost": "tab:orange",
                   "baseline": "tab:grey"}
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in (r for r in self.rows if r.label != r.baseline and r.psnr_db is not None):
            colour = "tab:red" if r.drift else colours.get(r.kind, "tab:blue")
            face = colour if r.same_image else "none"
            if r.speedup_p25 is not None and r.speedup_p75 is not None:
                ax.errorbar(r.psnr_db, r.speedup, yerr=[[r.speedup - r.speedup_p25],
                                                        [r.speedup_p75 - r.speedup]],
                            color=colour, mfc=face, fmt="o", markersize=6, capsize=3,
                            linewidth=1)
            else:
                ax.scatter(r.psnr_db, r.speedup, color=colour, facecolors=face, s=40)
            ax.annotate(r.label, (r.psnr_db, r.speedup), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.axvline(self.min_psnr, color="tab:red", linewidth=0.8, linestyle=":")
        against = f"reference {self.reference}" if self.reference else "diffusers baseline"
        ax.set_xlabel(f"PSNR to the {against}, dB (identical = {PSNR_CAP_DB:g}; hollow: a "
                      "different image by design)")
        ax.set_ylabel(f"speed-up vs {against}\n(median of paired per-round ratios, p25-p75)")
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
    """The report as one Rich table: baselines dimmed, drifting rows flagged, rows that make a
    different image by design flagged so (their PSNR/SSIM in brackets) and listed below."""
    from rich.markup import escape
    from rich.table import Table

    # Equal-cost rows differ from their configuration by their steps alone, which their label
    # says: they do not break a shared run description.
    runs = {f"{r.model} / {r.sampler} {r.steps} steps / {r.height}x{r.width} / guidance "
            f"{r.guidance:g} / batch {r.batch}" for r in report.rows if r.kind != "equal-cost"}
    shared = next(iter(runs)) if len(runs) == 1 else None
    judged = any(r.alignment is not None for r in report.rows)
    low, high = SPREAD_PERCENTILES
    table = Table(title=f"sdaccel bench on {escape(report.device_name)}: {report.iters} timed "
                  f"rounds (every row once per round, interleaved) after {report.warmup} "
                  f"warm-up call(s), {len(report.prompts)} prompt(s)"
                  + (f"\n{escape(shared)}" if shared else ""),
                  caption=escape(_caption(report, judged)), title_justify="left",
                  caption_justify="left")
    columns = [("configuration", "left")] + ([] if shared else [("run", "left")]) + [
        ("precision u/v/t", "left"), ("compile, passes", "left"), ("first call s", "right"),
        ("UNet steps/s", "right"), ("s/img p50", "right"), ("p90", "right"),
        ("img/s", "right"), ("peak MiB", "right"), ("NFE", "right"), ("cost", "right"),
        (f"speed-up (p{low}-p{high})", "right"), ("PSNR dB", "right"), ("SSIM", "right")] + (
        [("aligned", "right")] if judged else []) + [("", "left")]
    for name, justify in columns:
        table.add_column(name, justify=justify)
    for r in report.rows:
        run = [] if shared else [escape(f"{r.model} / {r.sampler} {r.steps} / "
                                        f"{r.height}x{r.width}")]
        aligned = [_percent(r.alignment)] if judged else []
        table.add_row(
            escape(r.label), *run, r.precision,
            escape(r.compile + (f", {r.passes}" if r.passes else "")),
            _num(r.first_call_seconds), _num(r.unet_steps_per_s, 1),
            _num(r.seconds_per_image_median, 3), _num(r.seconds_per_image_p90, 3),
            _num(r.images_per_s), f"{r.peak_memory_bytes / 2**20:.0f}", _num(r.nfe, 0),
            _num(r.cost, 2), _speedup(r), *_fidelity_cells(r), *aligned,
            _flag(r, report.reference),
            style="dim" if r.kind == "baseline" else None,
        )
    return table


def _caption(report: BenchReport, judged: bool) -> str:
    low, high = SPREAD_PERCENTILES
    against = f"the reference row ({report.reference})" if report.reference else "the baseline"
    lines = [
        f"speed-up: median over rounds of (s/img of {against}) / (the row's s/img) in the same "
        f"round (p{low}-p{high} of those ratios); cost: UNet work per image in full guided UNet "
        f"calls; memory: {report.memory_note}; PSNR/SSIM: against the image of {against} of the "
        "same prompt and seed, in brackets where the row makes a different image by design "
        "(listed below); "
        f"DRIFT: a row meant to make the same image whose worst image is below "
        f"{report.min_psnr:g} dB or SSIM {report.min_ssim:g}"
        + ("; aligned: share of the row's images in which the shapes judge reads back every "
           "attribute its caption states" if judged else "")]
    lines += [f"{r.label} vs {r.baseline}: {r.compared_with}" for r in report.rows
              if not r.same_image]
    return "\n".join(lines)


def _fidelity_cells(r: Row) -> tuple[str, str]:
    """PSNR and SSIM as shown; in brackets for a row that makes another image by design, where
    they measure how different that image is, not a loss."""
    psnr = "∞" if r.psnr_db is not None and r.psnr_db >= PSNR_CAP_DB else _num(r.psnr_db, 1)
    ssim = _num(r.ssim, 4)
    if r.same_image or r.psnr_db is None:
        return psnr, ssim
    return f"({psnr})", f"({ssim})"


def _flag(r: Row, reference: str | None) -> str:
    if r.label == r.baseline and reference:
        flag = "reference"
    elif r.drift:
        flag = "[bold red]DRIFT[/]" + (f" {_FLAGS[r.kind]}" if r.kind in ("peer", "equal-cost")
                                       else "")
    else:
        flag = _FLAGS.get(r.kind, "")
        if not r.same_image:
            flag += " different image"
    if r.compile_cache_entries:
        flag += " cache"
    return flag.strip()


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


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
