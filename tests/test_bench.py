"""bench: a diffusers baseline in the same run, warm-up never counted, fidelity that means
something (our fp32 loop reproduces the baseline's images; bf16 does not quite), outputs."""

import csv
import json

import pytest
from conftest import TINY
from typer.testing import CliRunner

from sdaccel import bench, gpu_stats
from sdaccel.cli import app
from sdaccel.engine.engine import Engine
from sdaccel.errors import ConfigError

PROMPTS = ["a red circle", "two blue squares"]
runner = CliRunner()


@pytest.fixture(scope="module")
def report_and_calls():
    calls = []
    original = Engine.generate

    def counting(self, prompts, negative_prompt="", seed=None):
        calls.append((self.settings.unet_dtype, prompts[0], seed))
        return original(self, prompts, negative_prompt, seed)

    Engine.generate = counting
    progress = []
    try:
        report = bench.benchmark(
            [("fp32", "tiny"), "tiny"], PROMPTS, iters=3, warmup=1,
            overrides=[*TINY, "sampler.steps=3", "optimize.fuse_qkv=true"],
            on_progress=progress.append,
        )
    finally:
        Engine.generate = original
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


def test_warmup_is_never_counted_and_seeds_follow_the_plan(report_and_calls):
    report, calls, progress = report_and_calls
    fp32 = [c for c in calls if c[0] == "fp32"]
    assert len(fp32) == 2 * (1 + 3)  # two configurations, each 1 warm-up + 3 timed calls
    assert fp32[:4] == [("fp32", "a red circle", 42), ("fp32", "two blue squares", 43),
                        ("fp32", "a red circle", 44), ("fp32", "two blue squares", 45)]
    row = report.row("fp32")
    assert row.iters == 3 and row.warmup == 1 and len(report.images["fp32"]) == 3
    timed = [p for p in progress if p.label == "fp32" and p.phase == "timed"]
    assert [p.done for p in timed] == [1, 2, 3] and timed[-1].total == 3
    assert [p.done for p in progress if p.label == "fp32" and p.phase == "warm-up"] == [1]


def test_measurements_are_consistent(report_and_calls):
    report, _, _ = report_and_calls
    base = report.row("diffusers fp32")
    for row in report.rows:
        assert 0 < row.seconds_per_image_median <= row.seconds_per_image_p90
        assert row.images_per_s > 0 and row.first_call_seconds > 0 and row.load_seconds > 0
        assert row.unet_steps_per_s > 0
        assert row.peak_memory_bytes > 50 * 2**20 and row.memory_kind == "cpu rss"
        assert row.nfe == 3 * 2  # 3 steps, guided: conditional + unconditional
        assert row.steps == 3 and (row.height, row.width) == (32, 32)
    fp32 = report.row("fp32")
    assert fp32.speedup == pytest.approx(base.seconds_per_image_median
                                         / fp32.seconds_per_image_median)
    assert base.speedup == 1.0


def test_our_fp32_loop_reproduces_the_baseline_images(report_and_calls):
    report, _, _ = report_and_calls
    fp32 = report.row("fp32")
    # Same latents to 1e-4, so the same 8-bit pixels (or nearly): fidelity at the cap.
    assert fp32.psnr_min_db > 50 and fp32.ssim_min > 0.999 and not fp32.drift


def test_reduced_precision_drifts_measurably_and_is_flagged():
    from conftest import tiny_settings

    bf16 = tiny_settings("unet_dtype=bf16", "vae_dtype=bf16", "sampler.steps=3")
    fp32 = tiny_settings("sampler.steps=3")
    report = bench.benchmark([("fp32", fp32), ("bf16", bf16)], PROMPTS[:1], iters=2, warmup=0)
    a, b = report.row("fp32"), report.row("bf16")
    assert b.precision == "bf16/bf16/fp32" and b.baseline == "diffusers fp32"
    assert b.psnr_db < a.psnr_db and b.ssim <= a.ssim
    assert b.drift == (b.psnr_min_db < bench.MIN_PSNR_DB or b.ssim_min < bench.MIN_SSIM)
    strict = bench.benchmark([("bf16", bf16)], PROMPTS[:1], iters=1, warmup=0, min_psnr=200.0,
                             also_baselines=["bf16"])
    assert strict.row("bf16").drift
    # diffusers itself in bf16, against the fp32 baseline: a row of its own, also below 200 dB.
    other = strict.row("diffusers bf16")
    assert (other.kind, other.baseline, other.precision) == ("baseline", "diffusers fp32",
                                                             "bf16 (all)")
    assert other.psnr_db < bench.PSNR_CAP_DB and other.drift


def test_each_sampler_and_step_count_gets_its_own_baseline():
    from conftest import tiny_settings

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
    args = ["bench", *sum((["--set", s] for s in TINY), []), "--steps", "2", "--iters", "2",
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
    with (tmp_path / "b.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["label"] for r in rows][1] == "tiny" and float(rows[1]["speedup"]) > 0
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"

    table = runner.invoke(app, [*args[:-2]])
    assert table.exit_code == 0, table.output
    for column in ("diffusers fp32", "baseline", "speed-up", "PSNR", "SSIM", "UNet steps/s",
                   "peak MiB"):
        assert column in table.stdout


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
    block = bytearray(64 * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    grown = gpu_stats.peak("cpu").peak_bytes
    del block
    assert grown - before > 48 * 2**20
    gpu_stats.reset_peak("cpu")
    assert gpu_stats.peak("cpu").peak_bytes < grown
