"""Adaptive compute per step: feature caching that reproduces the UNet, decisions that follow
their rules row by row, cost figures that agree with a FLOP-counting UNet, plain runs unchanged."""

import pytest
import torch
from helpers import tiny_settings

from sdaccel import metrics
from sdaccel.catalogue import PER_STEP as PER_STEP_SAMPLERS
from sdaccel.engine.engine import Engine
from sdaccel.engine.loading.models import load_components
from sdaccel.engine.sampling.adaptive import model_output_for, predicted_x0
from sdaccel.engine.sampling.cost import UNetCost, flop_counter
from sdaccel.engine.sampling.feature_cache import LayeredUNet
from sdaccel.engine.sampling.samplers import build_scheduler
from sdaccel.errors import ConfigError
from sdaccel.settings import resolve_settings

PER_STEP = ("adaptive.enabled=true", "adaptive.mode=per_step")
PROMPTS = ["a red circle on a blue background", "two green squares on a white background"]


def per_step(*extra, steps=8):
    return tiny_settings(*PER_STEP, f"sampler.steps={steps}", *extra)


def bundled(*extra):
    return resolve_settings("tiny", overrides=list(extra), environ={}).settings


# --------------------------------------------------------------------------- feature cache


@pytest.mark.parametrize(("model", "side", "context"), [
    ("bundled:shapes", 16, (16, 128)),  # DownBlock2D first, cross-attention deeper
    ("random:tiny", 8, (77, 32)),  # cross-attention first
    ("random:tiny", 10, (77, 32)),  # a side the upsamplers must be told (10 -> 5 -> 3 -> 5)
])
def test_layered_unet_is_the_unet_and_a_fresh_cache_changes_nothing(model, side, context):
    unet = load_components(model, device="cpu").unet.eval()
    layered = LayeredUNet(unet)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, side, side, generator=generator)
    c = torch.randn(2, *context, generator=generator)
    with torch.inference_mode():
        expected = unet(x, 321, encoder_hidden_states=c, return_dict=False)[0]
        for level in range(layered.levels):
            out, deep = layered.full(x, 321, c, level)
            assert torch.equal(out, expected)
            # Deep features of this very input: the shallow branch must give the same output.
            assert torch.equal(layered.shallow(x, 321, c, level, deep), expected)


def test_the_layered_sdxl_unet_reads_its_added_conditioning():
    unet = load_components("random:sdxl-tiny", device="cpu").unet.eval()
    layered = LayeredUNet(unet)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    c = torch.randn(2, 77, 64, generator=generator)
    added = {"text_embeds": torch.randn(2, 32, generator=generator),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.inference_mode():
        expected = unet(x, 321, encoder_hidden_states=c, added_cond_kwargs=added,
                        return_dict=False)[0]
        for level in range(layered.levels):
            out, deep = layered.full(x, 321, c, level, added)
            assert torch.equal(out, expected)
            assert torch.equal(layered.shallow(x, 321, c, level, deep, added), expected)


def flop_counting():
    """A UNet wrapper that counts the FLOPs of every call (full and shallow), and the list of
    counts it fills."""
    totals: list[int] = []

    def counting(call):
        def counted(unet_input):
            with flop_counter() as counter:
                out = call(unet_input)
            totals.append(counter.get_total_flops())
            return out
        return counted

    return counting, totals


def test_feature_caching_on_sdxl_costs_what_a_flop_counter_measures():
    settings = tiny_settings("model_id=random:sdxl-tiny", "generation.height=64",
                             "generation.width=64", *PER_STEP, "sampler.steps=8",
                             "adaptive.warmup_steps=2", "adaptive.cache.interval=3")
    counting, totals = flop_counting()

    engine = Engine(settings, unet_wrappers=[counting])
    result = engine.generate(PROMPTS[:1], seed=1)[0]
    assert "C" in result.decisions
    side = 64 // engine.vae_scale_factor
    full = UNetCost(engine.unet, engine.layered, (4, side, side), (77, 64),
                    engine.unet_dtype).full
    assert result.cost == pytest.approx(sum(totals) / (2 * full), rel=1e-6)


def test_cache_level_out_of_range_names_the_valid_levels():
    with pytest.raises(ConfigError, match=r"adaptive.cache.level: 3 .* skip levels 0-2"):
        Engine(per_step("adaptive.cache.interval=2", "adaptive.cache.level=3"))


# --------------------------------------------------------------------------- plain runs


@pytest.mark.parametrize("sampler", PER_STEP_SAMPLERS)
def test_per_step_with_nothing_to_save_is_the_plain_run_bit_for_bit(sampler):
    settings = [f"sampler.name={sampler}", "generation.num_images_per_prompt=2"]
    plain = Engine(tiny_settings(*settings, "sampler.steps=6")).generate(["a"], seed=3)
    stepwise = Engine(per_step(*settings, steps=6)).generate(["a"], seed=3)
    for a, b in zip(plain, stepwise, strict=True):
        assert torch.equal(a.latents, b.latents)
        assert b.decisions == "FFFFFF" and b.cost == 6.0 and b.nfe == a.nfe == 12
        assert a.decisions == "FFFFFF" and a.cost == 6.0


# --------------------------------------------------------------------------- decisions


def test_skips_follow_their_rules_and_rows_decide_alone(unet_calls):
    engine = Engine(bundled(*PER_STEP, "adaptive.warmup_steps=3", "adaptive.skip.threshold=0.05",
                            "adaptive.skip.max_consecutive=2", "adaptive.skip.final_steps=2"),
                    unet_wrappers=[unet_calls])
    calls = unet_calls.calls
    results = engine.generate(PROMPTS + ["a small yellow triangle in the top left"], seed=7)
    codes = [r.decisions for r in results]
    assert all(len(c) == 20 and c[:3] == "FFF" and c[-2:] == "FF" for c in codes)
    assert all("---" not in c for c in codes) and any("--" in c for c in codes)
    # Skipped steps cost nothing; the UNet saw exactly the rows that were evaluated.
    for r in results:
        assert r.cost == r.decisions.count("F") and r.nfe == 2 * r.decisions.count("F")
    assert sum(c.rows for c in calls) == sum(r.nfe for r in results)
    assert len({c for c in codes}) > 1, "rows of a batch decide on their own"
    # Skipping 2 in a row still draws the same picture: the fill is the solver's own step.
    plain = Engine(bundled()).generate(PROMPTS + ["a small yellow triangle in the top left"],
                                       seed=7)
    assert metrics.psnr([r.image for r in results], [r.image for r in plain]) > 30


def test_guidance_reuse_and_cut_off():
    reuse = Engine(bundled(*PER_STEP, "adaptive.warmup_steps=2", "adaptive.skip.final_steps=1",
                           "adaptive.guidance.interval=3")).generate(PROMPTS[:1], seed=1)[0]
    assert reuse.decisions == "FF" + "ffF" * 5 + "ff" + "F"
    assert reuse.cost == pytest.approx(8 + 0.5 * 12)  # 8 full steps, 12 conditional halves
    cut = Engine(bundled(*PER_STEP, "adaptive.guidance.cutoff=0.5")).generate(
        PROMPTS[:1], seed=1)[0]
    assert cut.decisions == "F" * 10 + "f" * 10 and cut.cost == 15.0
    # Agreement is per image: an absurdly loose threshold stops after the first step.
    agree = Engine(bundled(*PER_STEP, "adaptive.guidance.agree_threshold=100")).generate(
        PROMPTS[:1], seed=1)[0]
    assert agree.decisions == "F" + "f" * 19


def test_cache_refreshes_on_its_interval():
    engine = Engine(bundled(*PER_STEP, "adaptive.warmup_steps=2", "adaptive.cache.interval=3"))
    result = engine.generate(PROMPTS[:1], seed=1)[0]
    # The warm-up's full calls fill the cache: the first free step already reuses it.
    assert result.decisions == "FF" + "CCF" * 6
    fraction = UNetCost(engine.unet, engine.layered, (4, 16, 16), (16, 128),
                        engine.unet_dtype).fraction(0)
    assert 0.05 < fraction < 0.2  # conv_in and the last up layer of the bundled UNet
    assert result.cost == pytest.approx(8 + 12 * fraction)


# --------------------------------------------------------------------------- cost


def test_reported_cost_is_what_a_flop_counting_unet_measures():
    """FLOPs counted over the whole denoising loop (matmuls, convolutions, attention: the UNet's;
    the solver's arithmetic is elementwise) divided by one full guided call per step. The
    counter counts attention on real tensors too (its count must not miss a kernel)."""
    settings = bundled(*PER_STEP, "adaptive.warmup_steps=2", "adaptive.cache.interval=3",
                       "adaptive.skip.threshold=0.5", "adaptive.guidance.interval=2")
    counting, totals = flop_counting()

    engine = Engine(settings, unet_wrappers=[counting])
    results = engine.generate(PROMPTS, seed=2)
    unet = engine.unet
    with flop_counter() as counter, torch.inference_mode():
        unet(torch.zeros(2, 4, 16, 16), 500, encoder_hidden_states=torch.zeros(2, 16, 128))
    full_guided_call = counter.get_total_flops()
    assert set("".join(r.decisions for r in results)) >= {"F", "C", "c", "-"}
    assert sum(r.cost for r in results) == pytest.approx(sum(totals) / full_guided_call,
                                                         rel=1e-6)


# --------------------------------------------------------------------------- solver-aware fill


@pytest.mark.parametrize(("sampler", "prediction"), [
    ("dpm_solver++", "epsilon"), ("ddim", "v_prediction"), ("euler", "epsilon")])
def test_filled_model_output_gives_back_the_extrapolated_x0(sampler, prediction):
    config = dict(load_components("random:tiny", device="cpu").scheduler_config,
                  prediction_type=prediction)
    scheduler = build_scheduler(sampler, config)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[4]
    sample, x0 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    output = model_output_for(scheduler, sample, x0, t)
    assert torch.allclose(predicted_x0(scheduler, sample, output, t), x0, atol=1e-4)


# --------------------------------------------------------------------------- settings


def test_per_step_settings_keep_the_seed_keys_and_check_their_own():
    # The seed's adaptive block still means what it meant (re-plan), with every sampler
    # restriction; per_step works with every sampler, and its bounds are named.
    seed_block = tiny_settings("adaptive.enabled=true")
    assert seed_block.adaptive.mode == "replan"
    assert per_step("sampler.name=ddim", "adaptive.warmup_steps=9").adaptive.mode == "per_step"
    with pytest.raises(ConfigError, match="adaptive.mode replan needs a sampler"):
        tiny_settings("adaptive.enabled=true", "sampler.name=ddim")
    with pytest.raises(ConfigError, match=r"adaptive.guidance.cutoff.*less than or equal to 1"):
        per_step("adaptive.guidance.cutoff=1.5")
    with pytest.raises(ConfigError, match=r"adaptive.mode.*'replan' or 'per_step'"):
        tiny_settings("adaptive.mode=skip")


def test_forecast_deep_features_stay_closer_to_the_plain_run_than_reusing_them():
    """cache.forecast (TaylorSeer's first order) against DeepCache's plain reuse, interval 2."""
    prompts = PROMPTS + ["a small yellow triangle in the top left"]
    plain = [r.image for r in Engine(bundled()).generate(prompts, seed=5)]
    psnr = {}
    for forecast in ("true", "false"):
        engine = Engine(bundled(*PER_STEP, "adaptive.warmup_steps=3", "adaptive.cache.interval=2",
                                f"adaptive.cache.forecast={forecast}"))
        psnr[forecast] = metrics.psnr([r.image for r in engine.generate(prompts, seed=5)], plain)
    assert psnr["true"] > psnr["false"] + 1.0 and psnr["false"] > 30


def test_packaged_fast_setting_halves_the_work_and_keeps_the_pictures():
    """tiny-fast (the setting examples/frontier.py chose): on six held-out captions it costs at
    most 60% of the plain 20-step run and draws what the plain run draws."""
    from sdaccel.shapes import dataset

    captions = dataset.held_out_captions()[::6]
    fast = Engine(resolve_settings("tiny-fast", environ={}).settings).generate(captions, seed=1)
    plain = Engine(bundled()).generate(captions, seed=1)
    assert all(r.cost <= 0.6 * 20 for r in fast) and len({r.cost for r in fast}) > 1
    assert metrics.alignment([r.image for r in fast], captions)["aligned"] >= \
        metrics.alignment([r.image for r in plain], captions)["aligned"] - 1 / len(captions)
    # base (SD 1.5) defaults to the same decisions.
    base = resolve_settings("base", environ={}).settings
    tiny_fast = resolve_settings("tiny-fast", environ={}).settings
    assert base.adaptive == tiny_fast.adaptive and base.sampler == tiny_fast.sampler
