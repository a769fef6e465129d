"""Pre-packed oneDNN weights (optimize.prepack_weights): the same outputs as the plain layers, for
any input shape, following the weights when they change, invisible to copies, autograd and the
FLOP counter."""

import copy

import pytest
import torch
from helpers import relative_error as relative
from helpers import tiny_settings
from torch import nn

from sdaccel.engine.engine import Engine
from sdaccel.engine.sampling.cost import count_flops
from sdaccel.engine.speed import prepack
from sdaccel.engine.speed.optimize import apply_passes
from sdaccel.events import Warning

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="this PyTorch build has no oneDNN")

NATIVE_BF16 = torch.bfloat16 in prepack.packable_dtypes()
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not NATIVE_BF16,
                                                             reason="no native bf16 here"))


class Tokens(nn.Module):
    """Feature map to tokens, as a UNet's attention sees it: (batch, pixels, channels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


def layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(),
                         nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=2),
                         Tokens(), nn.Linear(16, 24), nn.Linear(24, 8, bias=False))


def packed_copy(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    assert prepack.pack_layers(twin) == 4
    return twin


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_one_packing_serves_every_batch_and_size_with_the_plain_layers_output(dtype):
    plain = layers().to(dtype)
    packed = packed_copy(plain)
    # fp32: the same sums reassociated; bf16: a different kernel's rounding of bf16 outputs.
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        for shape in [(2, 8, 16, 16), (1, 8, 16, 16), (3, 8, 8, 8), (2, 8, 32, 32)]:
            x = torch.randn(shape).to(dtype)
            assert relative(packed(x), plain(x)) < bound, shape
    assert all(isinstance(layer.packed, torch.Tensor) and layer.packed.is_mkldnn
               for layer in packed.modules() if isinstance(layer, prepack.Packed))


def test_a_weight_changed_in_place_is_packed_again():
    """A LoRA switch copies new values into the weights: the next call must use them."""
    plain = layers()
    packed = packed_copy(plain)
    x = torch.randn(2, 8, 16, 16)
    with torch.inference_mode():
        before = packed(x)
    with torch.no_grad():
        for model in (plain, packed):
            model[0].weight.mul_(2)
            model[4].weight.copy_(model[4].weight.flip(0))
    with torch.inference_mode():
        after = packed(x)
        assert relative(after, plain(x)) < 1e-5
    assert relative(after, before) > 0.1


def test_copies_casts_and_training_take_the_layers_as_they_are():
    packed = packed_copy(layers())
    x = torch.randn(2, 8, 16, 16)
    with torch.inference_mode():
        packed(x)  # packs
        twin = copy.deepcopy(packed)  # a oneDNN tensor cannot be copied: the twin packs anew
        assert relative(twin(x), packed(x)) == 0
        if NATIVE_BF16:
            half = copy.deepcopy(packed).to(torch.bfloat16)
            assert relative(half(x.bfloat16()), packed(x)) < 2e-2
    packed(x).sum().backward()  # autograd: the layers' own forward
    assert packed[0].weight.grad is not None


def test_the_flop_counter_sees_the_same_work():
    plain = layers()
    packed = packed_copy(plain)
    with torch.inference_mode():
        packed(torch.randn(2, 8, 16, 16))
    shape = (2, 8, 16, 16)
    assert count_flops(packed, shape) == count_flops(plain, shape) > 0


def test_only_plain_layers_of_a_native_dtype_are_swapped_and_unpack_restores_them(monkeypatch):
    class Int8Linear(nn.Linear):  # as bitsandbytes' layers: a subclass, with its own kernels
        pass

    model = nn.Sequential(nn.Linear(4, 4), Int8Linear(4, 4), nn.Conv2d(4, 4, 3, padding="same"),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert prepack.pack_layers(model) == 1
    assert [type(m).__name__ for m in model] == ["PackedLinear", "Int8Linear", "Conv2d", "Conv2d"]
    prepack.unpack_layers(model)
    assert type(model[0]) is nn.Linear
    monkeypatch.setattr(prepack, "packable_dtypes", lambda: {torch.float32})
    assert prepack.pack_layers(layers().to(torch.bfloat16)) == 0  # no native bf16: left alone


def test_the_engine_packs_unet_and_vae_and_gives_the_plain_image():
    plain = Engine(tiny_settings())
    packed = Engine(tiny_settings("optimize.prepack_weights=true"))
    assert packed.passes == ["prepack_weights"]
    assert type(packed.unet.conv_in).__name__ == "PackedConv2d"
    assert type(packed.vae.decoder.conv_out).__name__ == "PackedConv2d"
    ours = packed.generate(["a red circle"], seed=3)[0]
    reference = plain.generate(["a red circle"], seed=3)[0]
    assert torch.allclose(ours.latents, reference.latents, rtol=1e-4, atol=1e-4)
    assert ours.cost == reference.cost


def test_compiled_or_non_cpu_engines_say_it_does_nothing():
    events = []
    engine = Engine(tiny_settings("optimize.prepack_weights=true", "compile.enabled=true"),
                    on_event=events.append)
    assert "prepack_weights" not in engine.passes
    assert type(engine.unet.conv_in) is nn.Conv2d
    assert [e.message for e in events if isinstance(e, Warning)] == [
        "optimize.prepack_weights has no effect with compile.enabled=true: the compiled graph "
        "cannot take packed weights (compile.freezing packs them inside it)"]
    events.clear()
    unet, vae = copy.deepcopy(engine.unet), copy.deepcopy(engine.vae)
    settings = tiny_settings("optimize.prepack_weights=true")
    assert apply_passes(unet, vae, settings, torch.device("cuda"), events.append) == []
    assert events[0].message.startswith("optimize.prepack_weights has no effect on cuda")
