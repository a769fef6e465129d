"""optimize.attention=chunked: bf16 CPU self-attention as chunked matrix products, the same
attention as PyTorch's kernel; every call it does not fit goes to SDPA unchanged."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import relative_error as relative
from helpers import tiny_settings

from sdaccel.engine.engine import Engine
from sdaccel.engine.speed import chunked_attention as chunked
from sdaccel.engine.speed.optimize import check_attention
from sdaccel.errors import DeviceError


def qkv(keys: int, dtype=torch.float32, queries: int = 1100):
    torch.manual_seed(0)
    return (torch.randn(2, 3, queries, 40, dtype=dtype), torch.randn(2, 3, keys, 40, dtype=dtype),
            torch.randn(2, 3, keys, 24, dtype=dtype))


def test_chunks_compute_the_same_attention():
    # 1100 queries: two full chunks of 512 and a ragged one
    q, k, v = qkv(700)
    assert relative(chunked.chunked_attention(q, k, v), F.scaled_dot_product_attention(q, k, v)) \
        < 1e-5
    reference = F.scaled_dot_product_attention(q, k, v)
    ours = chunked.chunked_attention(*(t.bfloat16() for t in (q, k, v)))
    assert ours.dtype == torch.bfloat16 and relative(ours, reference) < 1e-2


def test_only_bf16_unmasked_calls_with_long_keys_are_taken_over(monkeypatch):
    taken = []
    monkeypatch.setattr(chunked, "chunked_attention",
                        lambda *args: taken.append(args[1].shape[-2]) or args[0])
    with chunked.ChunkedAttention():
        F.scaled_dot_product_attention(*qkv(300, torch.bfloat16))  # taken
        F.scaled_dot_product_attention(*qkv(77, torch.bfloat16))  # cross-attention: SDPA
        F.scaled_dot_product_attention(*qkv(300))  # fp32: SDPA
        q, k, v = qkv(300, torch.bfloat16)
        mask = torch.ones(2, 3, 1100, 300, dtype=torch.bool)
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # a mask: SDPA
    assert taken == [300]


def test_chunked_is_an_error_off_the_cpu():
    with pytest.raises(DeviceError, match="'chunked' is for the CPU, not cuda"):
        check_attention("chunked", torch.device("cuda"), torch.bfloat16)


def test_a_bf16_engine_with_chunked_attention_keeps_the_image(monkeypatch):
    """random:tiny at 32x32: 256-token self-attention at the first level, taken over."""
    monkeypatch.setattr(chunked, "pays_off", lambda: True)  # the CPU has no AMX
    bf16 = ["unet_dtype=bf16", "vae_dtype=bf16"]
    plain = Engine(tiny_settings(*bf16))
    fast = Engine(tiny_settings(*bf16, "optimize.attention=chunked"))
    assert fast.passes == ["attention=chunked"]
    ours = fast.generate(["a red circle"], seed=3)[0].latents
    reference = plain.generate(["a red circle"], seed=3)[0].latents
    assert relative(ours, reference) < 2e-2


def test_a_cpu_with_amx_keeps_pytorchs_kernel(monkeypatch):
    """There PyTorch's fused kernel computes bf16 on AMX tiles and is the faster one."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    taken = []
    monkeypatch.setattr(chunked, "chunked_attention", lambda *args: taken.append(1) or args[0])
    engine = Engine(tiny_settings("unet_dtype=bf16", "vae_dtype=bf16",
                                  "optimize.attention=chunked"))
    assert engine.passes == []
    engine.generate(["a red circle"], seed=3)
    assert taken == []


def test_inspect_config_says_chunked_runs_as_sdpa_on_a_cpu_with_amx(monkeypatch):
    from typer.testing import CliRunner

    from sdaccel.cli import app

    for amx in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        result = CliRunner().invoke(app, ["inspect-config", "--preset", "cpu"])
        assert result.exit_code == 0, result.output
        lines = [line for line in result.stdout.splitlines()
                 if line.startswith("# optimize.attention on this machine")]
        if amx:
            assert len(lines) == 1 and "chunked -> sdpa (this CPU has AMX" in lines[0]
        else:
            assert lines == []  # chunked runs as set: nothing to say
        as_json = CliRunner().invoke(app, ["inspect-config", "--preset", "cpu", "--json"])
        assert json.loads(as_json.stdout)["attention_in_force"] == ("sdpa" if amx else "chunked")
