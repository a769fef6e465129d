"""Reduced precision runs and stays close to fp32 (compile: test_compile.py)."""

import functools

import diffusers
import pytest
import torch
from helpers import tiny_settings

from sdaccel.engine.engine import Engine


@pytest.mark.parametrize("model", ["random:tiny", "random:sdxl-tiny"])
def test_int8_text_encoder_stays_close_to_fp32(model):
    """SDXL: both text encoders are quantised, and their joined embeddings and the pooled
    output stay as close."""
    fp32 = Engine(tiny_settings(f"model_id={model}"))
    int8 = Engine(tiny_settings(f"model_id={model}", "text_encoder_dtype=int8"))
    for encoder in filter(None, (int8.text_encoder, int8.text_encoder_2)):
        linear = next(module for name, module in encoder.named_modules()
                      if name.endswith("layers.0.self_attn.q_proj"))
        assert linear.weight.dtype == torch.int8
    prompts = ["a red circle on a blue background", "two green squares in the top left",
               "a red circle"]
    ours, theirs = (e.prompts.encode_pooled(prompts, None) for e in (fp32, int8))
    # README: within 2.5% relative error of fp32 on random:tiny (measured 1.5-2.0% per prompt,
    # LLM.int8() rounding); above 0.5%, or nothing was quantised.
    for a, b in list(zip(ours, theirs, strict=True))[:1 + fp32.components.is_sdxl]:
        relative = ((a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)).tolist()
        assert all(0.005 < r < 0.025 for r in relative), relative
    image = int8.generate(prompts[:1])[0]
    assert torch.isfinite(image.latents).all()


@pytest.mark.parametrize(("dtype", "low"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_reduced_precision_runs_the_unet_low_and_keeps_the_solver_in_fp32(monkeypatch, unet_calls,
                                                                          dtype, low):
    """README: latents and scheduler updates stay fp32 while the UNet runs in bf16/fp16. Seen
    inside the loop: what the UNet is given, and what every solver step takes, keeps in its
    multistep history and returns."""
    scheduler_class = diffusers.DPMSolverMultistepScheduler
    step, steps = scheduler_class.step, []

    @functools.wraps(step)  # same signature: the engine passes what step() takes
    def recording(self, model_output, timestep, sample, *args, **kwargs):
        out = step(self, model_output, timestep, sample, *args, **kwargs)
        history = {m.dtype for m in self.model_outputs if m is not None}
        steps.append((model_output.dtype, sample.dtype, out[0].dtype, history))
        return out

    monkeypatch.setattr(scheduler_class, "step", recording)
    engine = Engine(tiny_settings(f"unet_dtype={dtype}", f"vae_dtype={dtype}",
                                  "sampler.name=dpm_solver++"), unet_wrappers=[unet_calls])
    assert engine.unet.dtype == engine.vae.dtype == low
    calls = unet_calls.calls
    result = engine.generate(["a red circle"])[0]
    assert [c.dtype for c in calls] == [low] * 4
    fp32 = torch.float32
    assert steps == [(fp32, fp32, fp32, {fp32})] * 4
    assert result.latents.dtype == fp32 and torch.isfinite(result.latents).all()


def _cpu_with(monkeypatch, amx: bool, avx512_bf16: bool, arm: set[str] = frozenset()):
    """Pretend the CPU has (or lacks) each native bf16 feature."""
    from sdaccel.engine.loading import precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(precision, "arm_features", lambda: set(arm))


@pytest.mark.parametrize(("amx", "avx512_bf16", "arm", "feature"), [
    (True, True, set(), "AMX"), (False, True, set(), "AVX512-BF16"),
    (False, False, {"fp", "asimd", "bf16"}, "Arm BF16")])
def test_auto_picks_bf16_for_the_unet_and_vae_on_a_cpu_with_native_bf16(
        monkeypatch, amx, avx512_bf16, arm, feature):
    from sdaccel.engine.loading.precision import choose_precisions

    _cpu_with(monkeypatch, amx, avx512_bf16, arm)
    settings = tiny_settings("unet_dtype=auto", "vae_dtype=auto", "text_encoder_dtype=auto")
    chosen = choose_precisions(settings, torch.device("cpu"))
    assert {k: c.precision for k, c in chosen.items()} == {
        "unet_dtype": "bf16", "vae_dtype": "bf16", "text_encoder_dtype": "fp32"}
    assert feature in chosen["unet_dtype"].reason


def test_auto_never_picks_emulated_bf16_and_an_explicit_one_warns(monkeypatch):
    """A CPU without AMX/AVX512-BF16 runs bf16 16x slower than fp32 (AVX2 EPYC, measured):
    auto keeps fp32, the whole model runs as the fp32 one does, and bf16 asked for explicitly is
    kept but told."""
    _cpu_with(monkeypatch, amx=False, avx512_bf16=False)
    events = []
    auto = Engine(tiny_settings("unet_dtype=auto", "vae_dtype=auto", "text_encoder_dtype=auto"))
    assert (auto.settings.unet_dtype, auto.settings.vae_dtype) == ("fp32", "fp32")
    assert auto.unet.dtype == auto.vae.dtype == auto.text_encoder.dtype == torch.float32
    assert "no native bf16" in auto.precisions["unet_dtype"].reason
    fp32 = Engine(tiny_settings())
    assert torch.equal(auto.generate(["a red circle"])[0].latents,
                       fp32.generate(["a red circle"])[0].latents)
    explicit = Engine(tiny_settings("unet_dtype=bf16"), on_event=events.append)
    assert explicit.unet.dtype == torch.bfloat16
    assert any("unet_dtype: bf16" in e.message and "slower than fp32" in e.message
               for e in events)


def test_auto_on_cuda_takes_bf16_where_the_gpu_has_it_else_fp16(monkeypatch):
    from sdaccel.engine.loading.precision import choose_precision

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    for supported, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert choose_precision("unet_dtype", "auto", torch.device("cuda")).precision == expected


def test_inspect_config_says_what_auto_chose_and_why(monkeypatch):
    from typer.testing import CliRunner

    from sdaccel.cli import app

    _cpu_with(monkeypatch, amx=True, avx512_bf16=True)
    result = CliRunner().invoke(app, ["inspect-config", "--set", "unet_dtype=auto",
                                      "--set", "device=cpu"])
    assert result.exit_code == 0, result.output
    assert "#   unet_dtype: auto -> bf16 (this CPU has AMX: native bf16)" in result.stdout
    shown = CliRunner().invoke(app, ["inspect-config", "--json", "--set", "unet_dtype=auto",
                                     "--set", "device=cpu"])
    import json

    assert json.loads(shown.stdout)["precisions"]["unet_dtype"]["precision"] == "bf16"


def test_the_cpu_preset_stays_above_the_drift_bound_against_fp32_on_the_bundled_model(
        monkeypatch):
    """The `cpu` preset (bf16 where this CPU has it natively, weights pre-packed) against the
    plain fp32 engine, worst of four images: README's figures come from this comparison."""
    from sdaccel import metrics
    from sdaccel.bench import MIN_PSNR_DB, MIN_SSIM
    from sdaccel.engine.speed import chunked_attention
    from sdaccel.settings import resolve_settings

    # chunked attention as on a CPU without AMX (the bundled model's 64 tokens stay with SDPA)
    monkeypatch.setattr(chunked_attention, "pays_off", lambda: True)

    bundled = ["model_id=bundled:shapes", "generation.height=64", "generation.width=64",
               "generation.guidance_scale=4"]
    # reuse_freed_memory would hold for the rest of this process (tests/test_heap.py runs it
    # in its own); it does not touch the arithmetic.
    fast = Engine(resolve_settings("cpu", overrides=[*bundled, "optimize.reuse_freed_memory=false"],
                                   environ={}).settings)
    plain = Engine(resolve_settings("tiny", overrides=bundled, environ={}).settings)
    assert fast.passes == ["fuse_qkv", "channels_last", "prepack_weights", "attention=chunked"]
    assert plain.passes == []
    prompts = ["a red circle", "a blue square on the left", "two green triangles",
               "a small yellow star at the top"]
    ours, reference = fast.generate(prompts, seed=7), plain.generate(prompts, seed=7)
    psnr = [metrics.psnr(a.image, b.image) for a, b in zip(ours, reference, strict=True)]
    ssim = [metrics.ssim(a.image, b.image) for a, b in zip(ours, reference, strict=True)]
    print(f"cpu preset ({fast.settings.unet_dtype}) vs fp32: worst {min(psnr):.1f} dB, "
          f"{min(ssim):.3f} SSIM")
    assert min(psnr) >= MIN_PSNR_DB and min(ssim) >= MIN_SSIM
