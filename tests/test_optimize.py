"""Speed passes: each does what it says, composes from settings, and keeps the fp32 image."""

import pytest
import torch
from helpers import tiny_settings

from sdaccel import metrics
from sdaccel.bench import MIN_PSNR_DB
from sdaccel.engine.engine import Engine
from sdaccel.engine.speed import optimize
from sdaccel.errors import ConfigError, DeviceError
from sdaccel.events import Warning

ALL_PASSES = ["optimize.channels_last=true", "optimize.fuse_qkv=true",
              "optimize.vae_tiling=true", "optimize.prepack_weights=true",
              "optimize.attention=math"]


@pytest.fixture(scope="module")
def plain():
    return Engine(tiny_settings())


def test_defaults_change_nothing(plain):
    assert plain.passes == []
    assert plain.unet.conv_in.weight.is_contiguous()  # NCHW
    assert type(plain.unet.attn_processors[next(iter(plain.unet.attn_processors))]).__name__ \
        == "AttnProcessor2_0"
    assert not plain.vae.use_tiling


def test_every_pass_applies_and_the_image_stays_the_same(plain):
    fast = Engine(tiny_settings(*ALL_PASSES))
    assert fast.passes == ["fuse_qkv", "channels_last", "vae_tiling", "prepack_weights",
                           "attention=math"]
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not fast.unet.conv_in.weight.is_contiguous()
    processors = {type(p).__name__ for p in fast.unet.attn_processors.values()}
    assert processors == {"FusedAttnProcessor2_0"}
    attention = fast.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1")
    assert attention.to_qkv.weight.shape[0] == 3 * attention.to_q.weight.shape[0]
    assert fast.vae.use_tiling
    ours = fast.generate(["a red circle"], seed=3)[0]
    reference = plain.generate(["a red circle"], seed=3)[0]
    # Same arithmetic up to float reassociation (random weights: latents of size ~1-10).
    assert torch.allclose(ours.latents, reference.latents, rtol=1e-4, atol=1e-4)


def test_every_switch_of_the_settings_is_a_registered_pass():
    """A pass added to OptimizeSettings but not to the registry would silently do nothing."""
    from sdaccel.settings import OptimizeSettings

    switches = {k for k, f in OptimizeSettings.model_fields.items() if f.annotation is bool}
    assert switches == set(optimize.PASSES)


def test_vae_tiling_decodes_in_tiles_close_to_the_whole_image():
    """At 64x64 the random tiny VAE's 32x32 latents exceed its 16x16 tile (sample_size 32 over
    the VAE's factor 2): the decoder really runs on overlapping tiles, and the blended image
    stays within the bench's drift bound of the untiled one (measured: 33.4 dB)."""
    size = ["generation.height=64", "generation.width=64"]
    whole = Engine(tiny_settings(*size))
    tiled = Engine(tiny_settings(*size, "optimize.vae_tiling=true"))
    tiles = []
    tiled.vae.decoder.register_forward_hook(lambda _m, args, _o: tiles.append(args[0].shape))
    ours = tiled.generate(["a red circle"], seed=3)[0]
    reference = whole.generate(["a red circle"], seed=3)[0]
    # 3 x 3 tiles at stride 12 (a quarter overlaps): 16 latents wide, 8 at the far edges.
    assert sorted(tuple(shape[-2:]) for shape in tiles) == sorted(
        (h, w) for h in (16, 16, 8) for w in (16, 16, 8))
    assert torch.equal(ours.latents, reference.latents)  # tiling is the decode's alone
    assert MIN_PSNR_DB < metrics.psnr(ours.image, reference.image) < float("inf")


def test_attention_choice_is_a_context_around_each_call():
    seen = []

    def probe():
        seen.append((torch.backends.cuda.flash_sdp_enabled(),
                     torch.backends.cuda.math_sdp_enabled()))

    optimize.with_attention(probe, "math")()
    optimize.with_attention(probe, "flash")()
    probe()
    assert seen == [(False, True), (True, False), (True, True)]  # and restored afterwards
    assert optimize.with_attention(probe, "sdpa") is probe


def test_an_attention_kernel_the_device_lacks_is_an_error_naming_the_key():
    # PyTorch has no memory-efficient SDPA kernel on the CPU.
    with pytest.raises(DeviceError, match=r"optimize.attention: 'efficient' has no kernel on "
                       r"cpu.*valid: sdpa \(PyTorch picks\), chunked \(CPU\), flash, "
                       r"efficient, math"):
        Engine(tiny_settings("optimize.attention=efficient"))


def test_bad_values_name_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"optimize.attention.*'sdpa', 'flash', 'efficient', "
                       r"'math' or 'chunked'.*got 'fast'"):
        tiny_settings("optimize.attention=fast")
    with pytest.raises(ConfigError, match=r"unknown key; valid keys in optimize: channels_last,"
                       r" fuse_qkv, attention, vae_tiling, inductor_flags"):
        tiny_settings("optimize.cuda_graphs=true")


def test_inductor_flags_travel_with_the_compile_call(monkeypatch):
    calls = []

    def fake_compile(fn, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    Engine(tiny_settings("compile.enabled=true", "optimize.inductor_flags=true"))
    Engine(tiny_settings("compile.enabled=true", "compile.mode=max-autotune"))
    flagged, plain_mode = calls
    assert "mode" not in flagged  # torch.compile takes mode or options, not both
    assert flagged["options"] == {"triton.cudagraphs": True, **optimize.INDUCTOR_FLAGS}
    assert optimize.INDUCTOR_FLAGS == {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True,
                                       "epilogue_fusion": False,
                                       "coordinate_descent_check_all_directions": True}
    assert plain_mode == {"fullgraph": False, "dynamic": False, "mode": "max-autotune"}
    # Global inductor configuration is left alone.
    from torch._inductor import config

    assert config.conv_1x1_as_mm is False


def test_inductor_flags_without_compile_say_they_do_nothing():
    events = []
    engine = Engine(tiny_settings("optimize.inductor_flags=true"), on_event=events.append)
    assert engine.passes == []
    assert [e.message for e in events if isinstance(e, Warning)] == [
        "optimize.inductor_flags has no effect without compile.enabled=true: nothing is compiled"
    ]


@pytest.mark.parametrize(("guidance", "unet_batch"), [(7.5, 2), (1.0, 1)])
def test_guidance_one_skips_the_unconditional_pass(unet_calls, guidance, unet_batch):
    engine = Engine(tiny_settings(f"generation.guidance_scale={guidance}", "sampler.steps=2"),
                    unet_wrappers=[unet_calls])
    calls = unet_calls.calls
    engine.generate(["a red circle"])
    assert [c.rows for c in calls] == [unet_batch, unet_batch]
