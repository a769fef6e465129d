"""Reduced precision runs and stays close to fp32 (compile: test_compile.py)."""

import torch
from helpers import tiny_settings

from sdaccel.engine.engine import Engine


def test_int8_text_encoder_stays_close_to_fp32():
    fp32 = Engine(tiny_settings())
    int8 = Engine(tiny_settings("text_encoder_dtype=int8"))
    linear = int8.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj")
    assert linear.weight.dtype == torch.int8
    prompts = ["a red circle on a blue background", "two green squares in the top left"]
    a, b = fp32._embed(prompts), int8._embed(prompts)
    # Measured on random:tiny: relative error of the embeddings ~1e-2 (LLM.int8() rounding).
    relative = ((a - b).norm() / a.norm()).item()
    assert 0 < relative < 0.05
    image = int8.generate(prompts[:1])[0]
    assert torch.isfinite(image.latents).all()


def test_bf16_and_fp16_run_on_cpu():
    for dtype in ("bf16", "fp16"):
        engine = Engine(tiny_settings(f"unet_dtype={dtype}", f"vae_dtype={dtype}"))
        assert engine.unet.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        result = engine.generate(["a red circle"])[0]
        assert result.latents.dtype == torch.float32  # solver state kept in fp32
        assert torch.isfinite(result.latents).all()
