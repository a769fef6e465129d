"""bench: a diffusers baseline in the same run, rows timed in interleaved rounds and compared by
paired per-round ratios, warm-up never counted, fidelity that means something (our fp32 loop
reproduces the baseline's images; bf16 does not quite), cost per image, peers (DeepCache, ToMe)
on the baseline pipeline, fixed steps at equal cost, outputs."""

import csv
import importlib
import importlib.util
import json
import mmap
import re

import pytest
from helpers import TINY, set_flags, tiny_settings
from typer.testing import CliRunner

from sdaccel import bench, gpu_stats
from sdaccel.bench import runner as bench_runner
from sdaccel.cli import app
from sdaccel.errors import ConfigError

PROMPTS = ["a red circle", "two blue squares"]
runner = CliRunner()


def _after_each_call(monkeypatch, after):
    """Wrap the call of every row the runner loads (through the runner's loaders, public names
    of its module): `after(row, prompt, seed)` runs after each call. Tests count the calls and
    script the runner's clock with it."""
    def wrapped(load):
        def loader(*args, **kwargs):
            row = load(*args, **kwargs)
            call = row.call

            def counted(prompt, seed):
                result = call(prompt, seed)
                after(row, prompt, seed)
                return result

            row.call = counted
            return row
        return loader

    for name in ("load_engine", "load_pipeline"):
        monkeypatch.setattr(bench_runner, name, wrapped(getattr(bench_runner, name)))


@pytest.fixture(scope="module")
def report_and_calls():
    calls: list = []
    progress = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        _after_each_call(monkeypatch, lambda row, prompt, seed: calls.append(
            (row.label, prompt, seed)))
        report = bench.benchmark(
            [("fp32", "tiny"), "tiny"], PROMPTS, iters=3, warmup=1,
            overrides=[*TINY, "sampler.steps=3", "optimize.fuse_qkv=true"],
            on_progress=progress.append,
        )
    return report, calls, progress


def test_rows_baselines_and_labels(report_and_calls):
    report, _, _ = report_and_calls
    # Same sampler, steps, size and seeds: one baseline serves both configurations.
    assert [(r.label, r.kind, r.baseline) for r in report.rows] == [
        ("diffusers fp32", "baseline", "diffusers fp32"),
        ("fp32", "config", "diffusers fp32"),
        ("tiny", "config", "diffusers fp32"),
    ]
    assert report.row("tiny").passes == "fuse_qkv" and report.row("tiny").precision == \
        "fp32/fp32/fp32"
    assert report.row("diffusers fp32").precision == "fp32 (all)"


def test_rows_are_warmed_up_in_turn_then_timed_in_interleaved_rounds(report_and_calls):
    report, calls, progress = report_and_calls
    rows = ["diffusers fp32", "fp32", "tiny"]  # table order
    # Warm-up: each row's own call 0 in turn; then round r calls every row with call 1 + r's
    # prompt and seed (prompts in turn, seed 42 + call index).
    plan = [("a red circle", 42), ("two blue squares", 43), ("a red circle", 44),
            ("two blue squares", 45)]
    assert calls == [(row, *plan[i]) for i in range(4) for row in rows]
    row = report.row("fp32")
    assert row.iters == 3 and row.warmup == 1 and len(report.images["fp32"]) == 3
    timed = [p for p in progress if p.label == "fp32" and p.phase == "timed"]
    assert [p.done for p in timed] == [1, 2, 3] and timed[-1].total == 3
    assert [p.done for p in progress if p.label == "fp32" and p.phase == "warm-up"] == [1]
    # Everything is loaded before the first call, warmed up before the first timed round.
    phases = [p.phase for p in progress]
    assert phases.index("warm-up") > max(i for i, p in enumerate(phases) if p == "load")
    assert phases.index("timed") > max(i for i, p in enumerate(phases) if p == "warm-up")


def test_measurements_are_consistent(report_and_calls):
    report, _, _ = report_and_calls
    base = report.row("diffusers fp32")
    for row in report.rows:
        assert 0 < row.seconds_per_image_median <= row.seconds_per_image_p90
        assert row.images_per_s > 0 and row.first_call_seconds > 0 and row.load_seconds > 0
        assert row.unet_steps_per_s > 0
        # Its own footprint: its weights + its calls' rise above resident memory.
        assert row.memory_kind == "cpu rss"
        assert 2**20 < row.load_memory_bytes <= row.peak_memory_bytes
        assert row.nfe == 3 * 2  # 3 steps, guided: conditional + unconditional
        assert row.steps == 3 and (row.height, row.width) == (32, 32)
        # Plain 3-step runs: three full guided UNet calls per image, by any count.
        assert row.cost == 3.0
        assert row.speedup_p25 <= row.speedup <= row.speedup_p75
    assert base.cost_source == "steps" and report.row("fp32").cost_source == "engine"
    assert base.speedup == base.speedup_p25 == base.speedup_p75 == 1.0
    # On the CPU a row's load is the bytes of its weights: the same fp32 model, plus the fused
    # QKV projections that fuse_qkv adds beside the separate ones.
    assert report.row("tiny").load_memory_bytes > base.load_memory_bytes


def test_speedup_is_the_median_of_paired_per_round_ratios(monkeypatch):
    """A scripted clock: the configuration is 2x faster in the median round, although both
    rows' median seconds per image are equal (the ratio of medians would say 1.0x)."""
    now = [0.0]
    monkeypatch.setattr(bench_runner, "clock", lambda: now[0])
    base_seconds = iter([1.0, 2.0, 1.0, 4.0, 1.0])
    our_seconds = iter([0.5, 2.0, 0.25, 1.0, 1.0])  # ratios 2, 1, 4, 4, 1

    def tick(row, _prompt, _seed):
        now[0] += next(base_seconds if row.kind == "baseline" else our_seconds)

    _after_each_call(monkeypatch, tick)
    report = bench.benchmark([("ours", tiny_settings("sampler.steps=1"))], PROMPTS[:1], iters=5,
                             warmup=0)
    ours, base = report.row("ours"), report.row("diffusers fp32")
    assert ours.seconds_per_image_median == base.seconds_per_image_median == 1.0
    assert ours.speedup == pytest.approx(2.0)
    assert (ours.speedup_p25, ours.speedup_p75) == (pytest.approx(1.0), pytest.approx(4.0))
    assert bench.paired_speedup([1, 2, 1, 4, 1], [0.5, 2, 0.25, 1, 1]) == (2.0, 1.0, 4.0)


def test_our_fp32_loop_reproduces_the_baseline_images(report_and_calls):
    report, _, _ = report_and_calls
    fp32 = report.row("fp32")
    # Same latents to 1e-4, so the same 8-bit pixels (or nearly): fidelity at the cap.
    assert fp32.psnr_min_db > 50 and fp32.ssim_min > 0.999 and not fp32.drift


def test_reduced_precision_drifts_measurably_and_is_flagged():
    bf16 = tiny_settings("unet_dtype=bf16", "vae_dtype=bf16", "sampler.steps=3")
    fp32 = tiny_settings("sampler.steps=3")
    report = bench.benchmark([("fp32", fp32), ("bf16", bf16)], PROMPTS[:1], iters=2, warmup=0)
    a, b = report.row("fp32"), report.row("bf16")
    assert b.precision == "bf16/bf16/fp32" and b.baseline == "diffusers fp32"
    assert a.load_memory_bytes == report.row("diffusers fp32").load_memory_bytes  # same model
    assert b.load_memory_bytes < a.load_memory_bytes  # half-size UNet and VAE weights
    assert b.psnr_db < a.psnr_db and b.ssim <= a.ssim
    assert b.drift == (b.psnr_min_db < bench.MIN_PSNR_DB or b.ssim_min < bench.MIN_SSIM)
    # min_psnr is the line drift is judged by: one between fp32's and bf16's worst image (same
    # prompts and seeds, so the same images) flags bf16 and only bf16. PSNR is capped at
    # PSNR_CAP_DB, so the line must lie below the cap to mean anything.
    assert b.psnr_min_db + 1.0 < a.psnr_min_db <= bench.PSNR_CAP_DB
    line = (a.psnr_min_db + b.psnr_min_db) / 2
    strict = bench.benchmark([("fp32", fp32), ("bf16", bf16)], PROMPTS[:1], iters=2, warmup=0,
                             min_psnr=line, also_baselines=["bf16"])
    assert strict.min_psnr == line
    assert strict.row("bf16").psnr_min_db == b.psnr_min_db and strict.row("bf16").drift
    assert strict.row("fp32").psnr_min_db == a.psnr_min_db and not strict.row("fp32").drift
    # diffusers itself in bf16, against the fp32 baseline: a row of its own, judged by the line.
    other = strict.row("diffusers bf16")
    assert (other.kind, other.baseline, other.precision) == ("baseline", "diffusers fp32",
                                                             "bf16 (all)")
    assert other.psnr_db < bench.PSNR_CAP_DB
    assert other.drift == (other.psnr_min_db < line or other.ssim_min < bench.MIN_SSIM)


def test_each_sampler_and_step_count_gets_its_own_baseline():
    report = bench.benchmark(
        [("dpm", tiny_settings("sampler.steps=2")),
         ("ddim", tiny_settings("sampler.steps=2", "sampler.name=ddim")),
         ("dpm again", tiny_settings("sampler.steps=2", "seed=42"))],
        PROMPTS[:1], iters=1, warmup=0,
    )
    kinds = [(r.label, r.baseline) for r in report.rows]
    assert kinds == [("diffusers fp32", "diffusers fp32"), ("dpm", "diffusers fp32"),
                     ("diffusers fp32 #2", "diffusers fp32 #2"), ("ddim", "diffusers fp32 #2"),
                     ("dpm again", "diffusers fp32")]
    assert report.row("ddim").psnr_min_db > 50  # compared with a DDIM baseline, not DPM's


def test_config_specs_resolve_like_the_seed(tmp_path):
    seed_name = bench.resolve_configs("configs/sd15_mix_bf16_int8_ddpm50.yaml")[0]
    assert seed_name.label == "mix-bf16-int8" and seed_name.settings.unet_dtype == "bf16"
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("sampler:\n  steps: 7\n")
    mine = bench.resolve_configs([yaml_file, yaml_file], overrides=["seed=3"])
    assert [c.label for c in mine] == ["mine", "mine#2"]
    assert mine[0].settings.sampler.steps == 7 and mine[0].settings.seed == 3
    with pytest.raises(ConfigError, match="config file 'missing.yaml' does not exist"):
        bench.resolve_configs("missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'fastest'"):
        bench.resolve_configs("fastest")
    with pytest.raises(ConfigError, match="iters must be at least 1"):
        bench.benchmark("tiny", iters=0)


def test_cli_outputs_table_json_csv_and_plot(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# one per line\na red circle\n\n")
    args = ["bench", *set_flags(TINY), "--steps", "2", "--iters", "2",
            "--warmup", "0", "--prompts", str(prompts), "-p", "tiny", "-p",
            "sd15_fp32_ddpm50"]
    # The second preset is SD 1.5 on CUDA in its file: shorthand flags and --set apply to
    # every configuration, so here both run random:tiny on the CPU.
    result = runner.invoke(app, [*args, "--json", "--csv", str(tmp_path / "b.csv"), "--plot",
                                 str(tmp_path / "b.png")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["prompts"] == ["a red circle"] and data["iters"] == 2
    assert [r["label"] for r in data["rows"]] == ["diffusers fp32", "tiny", "diffusers fp32 #2",
                                                  "fp32-ddpm50"]
    tiny = data["rows"][1]
    assert tiny["speedup_p25"] <= tiny["speedup"] <= tiny["speedup_p75"]
    assert tiny["cost"] == tiny["steps"] == 4 and tiny["cost_source"] == "engine"
    assert "median" in data["timing"]["speedup"]
    with (tmp_path / "b.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["label"] for r in rows][1] == "tiny" and float(rows[1]["speedup"]) > 0
    assert float(rows[1]["cost"]) == 4.0 and float(rows[1]["speedup_p75"]) > 0
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"

    table = runner.invoke(app, [*args[:-2]])
    assert table.exit_code == 0, table.output
    for column in ("diffusers fp32", "baseline", "speed-up (p25-p75)", "PSNR", "SSIM",
                   "UNet steps/s", "peak MiB", "cost", "interleaved"):
        assert column in table.stdout
    # A row's speed-up with its spread: median (p25-p75) of the paired per-round ratios.
    assert re.search(r"tiny .* \d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\)", table.stdout)


def test_a_report_file_that_cannot_be_written_is_named_before_anything_runs(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    result = runner.invoke(app, ["bench", *set_flags(TINY), "--csv", str(blocker / "b.csv")])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"Error: --csv {str(blocker / 'b.csv')!r}: cannot write "
                                     f"there ({blocker} is not a folder)")
    assert blocker.read_text() == "keep me"


def test_a_report_write_that_fails_names_the_file(tmp_path, monkeypatch):
    """A disk that fills up after the run: one OutputError naming the file (exit 1)."""
    import errno
    from pathlib import Path

    from sdaccel.bench.report import BenchReport, Row
    from sdaccel.errors import OutputError

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    report = BenchReport.__new__(BenchReport)
    report.rows = [Row.__new__(Row)]
    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'b.csv'}: No space left"):
        report.write_csv(tmp_path / "b.csv")


def test_a_configuration_this_machine_cannot_run_is_named_before_anything_runs(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.invoke(app, ["bench", "-p", "mix-bf16-int8", "--iters", "1"])
    assert result.exit_code == 4
    assert "configuration 'mix-bf16-int8': device 'cuda' requested but CUDA is not available" \
        in result.stderr


def test_cli_errors_name_the_file():
    missing = runner.invoke(app, ["bench", "--prompts", "nowhere.txt"])
    assert missing.exit_code == 2 and "--prompts 'nowhere.txt': no such file" in missing.stderr
    plot = runner.invoke(app, ["bench", "--plot", "x.jpg"])
    assert plot.exit_code == 2 and "expected a .png" in plot.stderr


def test_cpu_peak_memory_window_resets():
    assert gpu_stats.reset_peak("cpu")
    before = gpu_stats.peak("cpu").peak_bytes
    # Fresh pages from the kernel: a malloc'd block may reuse freed heap memory already
    # resident (always so once optimize.reuse_freed_memory ran in this process).
    block = mmap.mmap(-1, 64 * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    grown = gpu_stats.peak("cpu").peak_bytes
    block.close()
    assert grown - before > 48 * 2**20
    gpu_stats.reset_peak("cpu")
    assert gpu_stats.peak("cpu").peak_bytes < grown


# --------------------------------------------------------------------------- peers, equal cost

# OpenVINO at f32: the same images as torch's fp32 up to float reassociation, on any CPU.
OPENVINO = "openvino:inference_precision=f32"
INSTALLED_PEERS = [name for name, module in (("deepcache", "DeepCache"), ("tomesd", "tomesd"),
                                             (OPENVINO, "openvino"))
                   if importlib.util.find_spec(module)]


def _adaptive():
    """Adaptive re-plan after 1 step with thresholds no score reaches: every image takes
    min_steps (2) of its max_steps (4) plan, so costs 2 full UNet calls."""
    return tiny_settings("adaptive.enabled=true", "adaptive.warmup_steps=1",
                         "adaptive.min_steps=2", "adaptive.max_steps=4",
                         "adaptive.uncertainty.threshold_low=1000",
                         "adaptive.uncertainty.threshold_high=1000")


@pytest.fixture(scope="module")
def peers_report():
    """The installed peers and --equal-cost beside a plain and an adaptive configuration."""
    return bench.benchmark([("plain", tiny_settings()), ("adaptive", _adaptive())], PROMPTS,
                           iters=2, warmup=1, peers=INSTALLED_PEERS, equal_cost=True)


def test_equal_cost_row_runs_fixed_steps_at_the_configurations_cost(peers_report):
    labels = [r.label for r in peers_report.rows]
    adaptive = peers_report.row("adaptive")
    assert (adaptive.steps, adaptive.cost, adaptive.nfe) == (4, 2.0, 4.0)
    fixed = peers_report.row("adaptive fixed 2")
    assert labels.index("adaptive fixed 2") == labels.index("adaptive") + 1
    assert (fixed.kind, fixed.baseline, fixed.equal_cost_of) == ("equal-cost", "diffusers fp32",
                                                                 "adaptive")
    assert (fixed.steps, fixed.cost, fixed.nfe) == (2, 2.0, 4.0)
    # Compared with the same 4-step baseline, timed in the same rounds.
    assert fixed.psnr_db < bench.PSNR_CAP_DB and len(peers_report.images[fixed.label]) == 2
    assert fixed.speedup_p25 <= fixed.speedup <= fixed.speedup_p75
    # A configuration that costs its whole plan gets no such row.
    assert peers_report.row("plain").cost == 4.0
    assert not any(r.equal_cost_of == "plain" for r in peers_report.rows)


def test_deepcache_peer_row(peers_report):
    pytest.importorskip("DeepCache")
    row = peers_report.row("deepcache")
    assert (row.kind, row.baseline, row.steps, row.nfe) == ("peer", "diffusers fp32", 4, 8.0)
    assert row.passes.startswith("DeepCache ") and "cache_interval=3 cache_branch_id=0" in \
        row.passes
    # Measured FLOPs: the full UNet at steps 1 and 4, only the shallowest branch at 2 and 3.
    assert row.cost_source == "flops" and 2.0 < row.cost < 3.0
    assert row.psnr_db < bench.PSNR_CAP_DB  # reused deep features change the image
    assert row.speedup_p25 <= row.speedup <= row.speedup_p75
    assert len(peers_report.images["deepcache"]) == 2
    assert peers_report.versions["DeepCache"] in row.passes  # the report names the version


def test_tomesd_peer_row(peers_report):
    pytest.importorskip("tomesd")
    row = peers_report.row("tomesd")
    assert (row.kind, row.baseline, row.nfe) == ("peer", "diffusers fp32", 8.0)
    assert row.passes.startswith("tomesd ") and "ratio=0.5" in row.passes
    # Merged tokens: less attention work in every step at the highest resolution.
    assert row.cost_source == "flops" and 0 < row.cost < 4.0
    assert row.psnr_db < bench.PSNR_CAP_DB
    assert row.speedup_p25 <= row.speedup <= row.speedup_p75


def test_openvino_peer_row(peers_report):
    pytest.importorskip("openvino")
    row = peers_report.row(OPENVINO)
    assert (row.kind, row.baseline, row.steps, row.nfe) == ("peer", "diffusers fp32", 4, 8.0)
    assert row.passes.startswith("openvino ") and "inference_precision=f32" in row.passes
    # The same UNet work, run by OpenVINO: the baseline's cost, OpenVINO's precision.
    assert (row.cost_source, row.cost, row.precision) == ("steps", 4.0, "f32 (OpenVINO)")
    assert row.psnr_db >= 45, row.psnr_db  # f32: the baseline's images
    assert len(peers_report.images[OPENVINO]) == 2


def test_cli_peer_with_its_own_parameters():
    pytest.importorskip("DeepCache")
    result = runner.invoke(app, ["bench", *set_flags(TINY), "--iters",
                                 "1", "--warmup", "0", "--peer", "deepcache:cache_interval=2",
                                 "--json"])
    assert result.exit_code == 0, result.output
    peer = [r for r in json.loads(result.stdout)["rows"] if r["kind"] == "peer"]
    assert [r["label"] for r in peer] == ["deepcache:cache_interval=2"]
    assert "cache_interval=2" in peer[0]["passes"] and 2.0 < peer[0]["cost"] < 4.0


def test_peer_specs_are_checked():
    spec = bench.parse_peer("deepcache:cache_interval=5")
    assert spec.params == {"cache_interval": 5, "cache_branch_id": 0}
    assert spec.label == "deepcache:cache_interval=5" and bench.parse_peer("tomesd").label == \
        "tomesd"
    assert bench.parse_peer("tomesd:ratio=0.3,use_rand=false").params["use_rand"] is False
    for bad, message in (("fastcache", "unknown peer 'fastcache'; valid: deepcache, tomesd, "
                                        "openvino"),
                         ("deepcache:interval=3", "KEY one of cache_interval, cache_branch_id"),
                         ("tomesd:ratio=lots", "ratio must be a float, got 'lots'"),
                         ("openvino:inference_precision=int4", "inference_precision 'int4' is "
                          "not one of default, f32, bf16, f16")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            bench.parse_peer(bad)
    result = runner.invoke(app, ["bench", "--peer", "fastcache"])
    assert result.exit_code == 2 and "unknown peer 'fastcache'" in result.stderr


def test_a_missing_peer_package_is_named_before_anything_runs(monkeypatch):
    real = importlib.import_module

    def without_tomesd(name, *args):
        if name == "tomesd":
            raise ImportError("No module named 'tomesd'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_tomesd)
    result = runner.invoke(app, ["bench", *set_flags(TINY), "--peer",
                                 "tomesd"])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "Error: peer 'tomesd' needs the tomesd package, which does not import here (No module "
        "named 'tomesd'): pip install 'sdaccel[peers]'")


def test_a_peer_that_fails_on_this_diffusers_is_named_in_one_line(monkeypatch):
    import diffusers

    from sdaccel.bench import peers

    def broken(pipe, params):
        raise TypeError("forward() got an unexpected keyword argument 'added_cond_kwargs'")

    monkeypatch.setitem(peers.PEERS, "deepcache",
                        peers.Peer("deepcache", "DeepCache", "json", {"cache_interval": 3},
                                   ("cache_interval",), broken))
    result = runner.invoke(app, ["bench", *set_flags(TINY), "--peer",
                                 "deepcache", "--iters", "1", "--warmup", "0"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert lines == [
        f"Error: peer 'deepcache' (DeepCache {peers.package_version('DeepCache')}) failed with "
        f"diffusers {diffusers.__version__}: TypeError: forward() got an unexpected keyword "
        "argument 'added_cond_kwargs'"]
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- reference, fidelity


def test_a_reference_rows_speedup_is_paired_with_it_round_by_round(monkeypatch):
    """--reference: the fast row's speed-up is the median of (reference s/img in round r) /
    (its s/img in round r), scripted: 2x in the median round, though both rows' median s/img
    are equal. The diffusers rows answer to the reference too; without baselines only the
    configurations run, with the same pairing."""
    now = [0.0]
    monkeypatch.setattr(bench_runner, "clock", lambda: now[0])
    scripts: dict = {}

    def tick(row, _prompt, _seed):
        now[0] += 1.0 if row.kind == "baseline" else next(scripts[row.settings.sampler.name])

    _after_each_call(monkeypatch, tick)
    configs = [("slow", tiny_settings("sampler.steps=2")),
               ("fast", tiny_settings("sampler.steps=1", "sampler.name=ddim"))]
    for baselines in (True, False):
        scripts.update(ddim=iter([0.5, 2.0, 0.25, 1.0, 1.0]),  # ratios 2, 1, 4, 4, 1
                       **{"dpm_solver++": iter([1.0, 2.0, 1.0, 4.0, 1.0])})
        report = bench.benchmark(configs, PROMPTS[:1], iters=5, warmup=0, reference="slow",
                                 baselines=baselines)
        slow, fast = report.row("slow"), report.row("fast")
        assert slow.seconds_per_image_median == fast.seconds_per_image_median == 1.0
        assert (fast.speedup, fast.speedup_p25, fast.speedup_p75) == (
            pytest.approx(2.0), pytest.approx(1.0), pytest.approx(4.0))
        assert slow.speedup == 1.0 and report.reference == "slow"
        assert {r.baseline for r in report.rows} == {"slow"}
        assert report.to_dict()["reference"] == "slow"
    assert [r.label for r in report.rows] == ["slow", "fast"]  # the run without baselines


def test_a_reference_or_a_run_without_baselines_that_cannot_be_is_one_line():
    with pytest.raises(ConfigError, match=re.escape(
            "reference 'cpu' is not a configuration of this run; valid: tiny, ddim")):
        bench.benchmark(["tiny", ("ddim", "tiny")], reference="cpu")
    with pytest.raises(ConfigError, match="baselines off needs a reference configuration"):
        bench.benchmark("tiny", baselines=False)
    with pytest.raises(ConfigError, match="no diffusers pipeline for also_baselines or peers"):
        bench.benchmark("tiny", reference="tiny", baselines=False, peers=["tomesd"])
    result = runner.invoke(app, ["bench", *set_flags(TINY), "-p", "tiny", "--reference",
                                 "cpu-fast"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("Error: reference 'cpu-fast' is not a configuration of "
                                     "this run; valid: tiny")


def test_a_row_that_makes_another_image_by_design_says_so_and_is_not_drift(tmp_path):
    """A DDIM row at guidance 1 against the DPM-Solver++ reference at guidance 4: far below the
    PSNR bound, yet no DRIFT, and the row, the JSON, the CSV and the table say what it is
    compared with. The same settings again are the same image, judged as ever."""
    ddim = tmp_path / "ddim.yaml"
    ddim.write_text("sampler:\n  name: ddim\ngeneration:\n  guidance_scale: 1.0\n")
    args = ["bench", *set_flags(TINY), "--iters", "2", "--warmup", "0", "--prompts",
            str(tmp_path / "p.txt"), "-p", "tiny", "-p", "tiny", "-c", str(ddim),
            "--reference", "tiny", "--no-baselines"]
    (tmp_path / "p.txt").write_text("a red circle\n")
    result = runner.invoke(app, [*args, "--json", "--csv", str(tmp_path / "b.csv")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {r["label"]: r for r in data["rows"]}
    assert list(rows) == ["tiny", "tiny#2", "ddim"] and data["reference"] == "tiny"
    other = rows["ddim"]
    assert other["psnr_min_db"] < bench.MIN_PSNR_DB and not other["drift"]
    assert not other["same_image"] and other["baseline"] == "tiny"
    assert other["compared_with"] == ("different image: 4 ddim steps vs 4 dpm_solver++; "
                                      "guidance 1 vs 4")
    again = rows["tiny#2"]
    assert again["same_image"] and again["compared_with"] == "same image"
    assert again["psnr_min_db"] == bench.PSNR_CAP_DB and not again["drift"]
    assert rows["tiny"]["compared_with"] == "" and rows["tiny"]["speedup"] == 1.0
    with (tmp_path / "b.csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert csv_rows[2]["compared_with"] == other["compared_with"]
    assert csv_rows[2]["same_image"] == "False" and csv_rows[2]["drift"] == "False"

    table = runner.invoke(app, args, terminal_width=250)
    assert table.exit_code == 0, table.output
    ddim_line = next(line for line in table.stdout.splitlines() if line.startswith("│ ddim"))
    assert "different image" in ddim_line and "DRIFT" not in ddim_line
    assert re.search(r"\(\d+\.\d\)", ddim_line)  # its PSNR, in brackets
    assert "ddim vs tiny: different image: 4 ddim steps vs 4 dpm_solver++; guidance 1 vs 4" in \
        table.stdout
    assert "reference" in next(line for line in table.stdout.splitlines()
                               if line.startswith("│ tiny "))


def test_what_makes_another_image_is_named_and_the_rest_is_not():
    from sdaccel.bench.fidelity import differences, pipeline_recipe, recipe
    from sdaccel.shapes import BUNDLED_DIR

    ring = BUNDLED_DIR.parent / "loras" / "ring.safetensors"
    base = tiny_settings("sampler.steps=20", "generation.guidance_scale=7.5")
    few = tiny_settings("sampler.name=ddim", "generation.guidance_scale=1",
                        f"loras=[{{path: {ring}, weight: 0.5}}]",
                        "tiny_decoder=models/taesd_decoder.safetensors",
                        "generation.height=64", "unet_dtype=bf16")
    assert differences(recipe(few, 4), recipe(base, 20)) == [
        "4 ddim steps vs 20 dpm_solver++", "64x32 vs 32x32", "guidance 1 vs 7.5",
        "LoRA ring.safetensors:0.5 vs none",
        "decoder tiny (taesd_decoder.safetensors) vs full VAE"]
    # Precision, passes, compile, adaptive compute: approximations of the same image.
    faster = tiny_settings("unet_dtype=bf16", "optimize.fuse_qkv=true", "adaptive.enabled=true",
                           "prompt.weighting=false")
    assert differences(recipe(faster, 4), recipe(tiny_settings(), 4)) == []
    # A plain pipeline loads no textual-inversion embeddings: a row that does differs from it.
    with_embedding = tiny_settings("embeddings=[learned.pt]")
    assert differences(recipe(with_embedding, 4), pipeline_recipe(with_embedding, 4)) == [
        "embeddings [{'path': 'learned.pt', 'token': None, 'sha256': None}] vs none"]


def test_bundled_rows_report_caption_alignment_on_held_out_captions():
    """Without prompts, a run with the bundled model draws held-out shape captions; every row of
    that model, its diffusers baseline included, reports the share of its images the judge reads
    fully right. Another model's row has no such figure."""
    from sdaccel.shapes import dataset, judge

    report = bench.benchmark(["tiny", ("random", tiny_settings())], iters=2, warmup=1,
                             overrides=["sampler.steps=2"])
    assert report.prompts == dataset.held_out_captions()[:3]
    assert [r.label for r in report.rows] == ["diffusers fp32", "tiny", "diffusers fp32 #2",
                                              "random"]
    for label in ("diffusers fp32", "tiny"):
        images = report.images[label]
        expected = sum(judge.score(image, caption).aligned for image, caption in
                       zip(images, report.prompts[1:], strict=True)) / 2
        assert report.row(label).alignment == expected
    assert report.row("random").alignment is None
    assert report.row("diffusers fp32 #2").alignment is None
    assert "aligned" in [c.header for c in report.table().columns]


def test_the_baseline_loads_the_rows_lora_and_tiny_decoder(tmp_path):
    """A LoRA row and a tiny-decoder row each get a diffusers baseline of their own, with the
    LoRA loaded by diffusers (fused) and the decoder in place of the VAE: the same image."""
    from diffusers import AutoencoderTiny

    from sdaccel import metrics
    from sdaccel.settings import layer_over, resolve_settings
    from sdaccel.shapes import BUNDLED_DIR

    ring = BUNDLED_DIR.parent / "loras" / "ring.safetensors"
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                    num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1),
                    latent_channels=4).save_pretrained(tmp_path / "taesd")
    shapes = resolve_settings("tiny", environ={}).settings  # the bundled model, the ring's
    with_ring = layer_over(shapes, None, [f"loras=[{{path: {ring}}}]"]).settings
    report = bench.benchmark(
        [("plain", shapes), ("ring", with_ring), ("random", tiny_settings()),
         ("taesd", tiny_settings(f"tiny_decoder={tmp_path / 'taesd'}"))],
        PROMPTS[:1], iters=1, warmup=0, overrides=["sampler.steps=2"])
    assert [(r.label, r.baseline) for r in report.rows if r.kind == "config"] == [
        ("plain", "diffusers fp32"), ("ring", "diffusers fp32 #2"),
        ("random", "diffusers fp32 #3"), ("taesd", "diffusers fp32 #4")]
    for label, plain in (("ring", "diffusers fp32"), ("taesd", "diffusers fp32 #3")):
        row = report.row(label)
        assert row.same_image and row.psnr_min_db > 50 and not row.drift, label
        # ... and not the image of the same model's plain baseline.
        assert metrics.psnr(report.images[row.baseline], report.images[plain]) < 40, label


def test_an_sdxl_row_gets_an_sdxl_pipeline_baseline_with_the_same_images():
    """random:sdxl-tiny: the baseline is a StableDiffusionXLPipeline on the same components, an
    empty negative prompt zeros on both sides; a prompt in A1111 syntax reaches it as sdaccel's
    embeddings of both encoders and the pooled ones (negative too). The images are the same."""
    sdxl = tiny_settings("model_id=random:sdxl-tiny", "generation.height=64",
                         "generation.width=64", "sampler.steps=3")
    prompts = ["a red circle", "a (red:1.3) circle BREAK two blue squares"]
    report = bench.benchmark([("sdxl", sdxl)], prompts, iters=2, warmup=0)
    row = report.row("sdxl")
    assert row.baseline == "diffusers fp32" and report.row(row.baseline).kind == "baseline"
    assert row.same_image and not row.drift
    assert row.psnr_min_db == bench.PSNR_CAP_DB
    assert report.row(row.baseline).notes.startswith("1 of 2 prompt(s) exceed")


def test_the_openvino_peer_runs_sdxl_with_the_baselines_images():
    """SDXL through OpenVINO (f32): both text encoders (pooled projection and penultimate
    hidden states), the UNet with its added conditioning and the VAE decoder converted; the
    images are the StableDiffusionXLPipeline baseline's."""
    pytest.importorskip("openvino")
    sdxl = tiny_settings("model_id=random:sdxl-tiny", "generation.height=64",
                         "generation.width=64", "sampler.steps=3")
    report = bench.benchmark([("sdxl", sdxl)], ["a red circle"], iters=1, warmup=0,
                             peers=[OPENVINO])
    row = report.row(OPENVINO)
    assert (row.kind, row.baseline, row.precision) == ("peer", "diffusers fp32", "f32 (OpenVINO)")
    assert row.psnr_min_db >= 45, row.psnr_min_db


def test_the_default_bench_is_right_on_the_first_run():
    """`sdaccel bench` on the defaults (the tiny preset, bundled:shapes): held-out captions the
    model knows, the same images as its diffusers baseline, nothing to warn about."""
    from sdaccel.shapes import dataset

    result = runner.invoke(app, ["bench", "--iters", "2", "--warmup", "0", "--steps", "4",
                                 "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["prompts"] == dataset.held_out_captions()[:2]
    assert [(r["label"], r["drift"], r["same_image"]) for r in data["rows"]] == [
        ("diffusers fp32", False, True), ("tiny", False, True)]
    assert data["rows"][1]["psnr_min_db"] == bench.PSNR_CAP_DB
    assert data["warnings"] == [] and "Warning" not in result.stderr


def test_prompts_beyond_the_window_condition_the_baseline_as_the_rows_and_warn_once(tmp_path):
    """The seed's prompts on bundled:shapes: two of them hold words the model never saw, spelt
    in more tokens than its 16-token window. The engine reads them whole in chained chunks; the
    baseline is given those embeddings (and says so) instead of cutting them, so the images are
    the same and nothing drifts. A configuration that cuts them (prompt.weighting false) gets a
    baseline that cuts them too. Each engine warning is said once for the run, naming the rows
    that had it, not once per row."""
    prompts = tmp_path / "seed.txt"
    prompts.write_text("\n".join(bench.DEFAULT_PROMPTS) + "\n")
    cut = tmp_path / "cut.yaml"
    cut.write_text("prompt:\n  weighting: false\n")
    result = runner.invoke(app, ["bench", "--iters", "3", "--warmup", "0", "--steps", "4",
                                 "--prompts", str(prompts), "-p", "tiny", "-p", "tiny",
                                 "-c", str(cut), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {r["label"]: r for r in data["rows"]}
    assert [(label, r["baseline"]) for label, r in rows.items()] == [
        ("diffusers fp32", "diffusers fp32"), ("tiny", "diffusers fp32"),
        ("tiny#2", "diffusers fp32"), ("diffusers fp32 #2", "diffusers fp32 #2"),
        ("cut", "diffusers fp32 #2")]
    for label in ("tiny", "tiny#2", "cut"):
        row = rows[label]
        assert row["same_image"] and not row["drift"], label
        assert row["psnr_min_db"] == bench.PSNR_CAP_DB, label
    assert rows["diffusers fp32"]["notes"].startswith("2 of 3 prompt(s) exceed the text "
                                                      "encoder's 16-token window")
    assert rows["diffusers fp32 #2"]["notes"] == ""
    # Said once each, for every row that had it.
    said = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert said and len(said) == len(set(said)) == len(data["warnings"])
    unknown = [w for w in data["warnings"] if "never saw" in w["message"]]
    assert unknown and all(w["rows"] == ["tiny", "tiny#2", "cut"] for w in unknown)
    cuts = [w for w in data["warnings"] if "are cut" in w["message"]]
    assert cuts and all(w["rows"] == ["cut"] for w in cuts)
    assert rows["tiny"]["warnings"] == [w["message"] for w in unknown]
