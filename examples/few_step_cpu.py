"""SD 1.5's architecture on the CPU: the `cpu-fast` preset against the `cpu` preset, one bench run.

No SD 1.5 weights can be downloaded here, so `random:sd15` (the real architecture, seeded random
weights) stands in for the model, and two files of the real files' shapes stand in for what a
user downloads:

- an LCM-LoRA: rank 64 on every linear and convolution layer of the UNet's blocks (the
  published `latent-consistency/lcm-lora-sdv1-5` targets, 67.5 M parameters), random tensors,
  kohya keys; fused once into the weights, so its values do not change the time;
- a TAESD decoder: diffusers' `AutoencoderTiny` default config (TAESD's architecture), random
  weights, saved in `taesd_decoder.safetensors`'s own layout.

Rows (all at 512x512, `sdaccel.bench.benchmark` with `reference="cpu"`, no diffusers baselines,
timed interleaved in the same rounds): `cpu` (DPM-Solver++ 20 steps, guidance 7.5, full VAE);
`cpu-fast` at 4 and 2 LCM steps, guidance 1, tiny decoder (each SD 1.5 engine holds about
6 GiB here: a fourth row would not fit in 24 GiB). Then the decode alone, tiny against the full
VAE, paired on the same latents. Nothing else should use the CPU meanwhile::

    python examples/few_step_cpu.py                 # iters 3, warm-up 1: about 6 minutes
    python examples/few_step_cpu.py --iters 5 --size 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from sdaccel.bench import benchmark  # noqa: E402
from sdaccel.settings import resolve_settings  # noqa: E402

LCM_LORA_RANK = 64


def write_lcm_lora_like(path: Path, seed: int = 0) -> int:
    """A random LoRA with the published SD 1.5 LCM-LoRA's layers and rank, kohya keys; returns
    its parameter count."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from sdaccel.engine.loading.models import arch_dir
    from sdaccel.training.train_lcm import UNET_TARGETS
    from sdaccel.training.train_lora import kohya_state_dict

    torch.manual_seed(seed)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(arch_dir("sd15") / "unet"))
    inject_adapter_in_model(LoraConfig(r=LCM_LORA_RANK, lora_alpha=LCM_LORA_RANK,
                                       target_modules=UNET_TARGETS), unet)
    state = {k: (torch.randn(v.shape) * 1e-3).to(torch.float16)
             for k, v in get_peft_model_state_dict(unet).items()}
    save_file(kohya_state_dict(state, {}, LCM_LORA_RANK), str(path))
    return sum(v.numel() for v in state.values())


def write_taesd_like(path: Path, seed: int = 0) -> None:
    """A random TAESD decoder in the layout of madebyollin/taesd's taesd_decoder.safetensors."""
    from diffusers import AutoencoderTiny
    from safetensors.torch import save_file

    from sdaccel.engine.loading.decoders import diffusers_to_taesd

    torch.manual_seed(seed)
    decoder = AutoencoderTiny().decoder.state_dict()
    save_file({k: v.contiguous() for k, v in diffusers_to_taesd(decoder).items()}, str(path))


def rows(size: int, lora: Path, taesd: Path) -> list[tuple[str, object]]:
    common = ["model_id=random:sd15", f"generation.height={size}", f"generation.width={size}"]
    fast = [*common, f"loras=[{lora}]"]

    def settings(preset: str, *extra: str):
        return resolve_settings(preset, overrides=[*extra], environ={}).settings

    return [
        ("cpu", settings("cpu", *common)),
        ("cpu-fast 4 steps", settings("cpu-fast", *fast, f"tiny_decoder={taesd}")),
        ("cpu-fast 2 steps", settings("cpu-fast", *fast, f"tiny_decoder={taesd}",
                                      "sampler.steps=2")),
    ]


def decode_alone(size: int, taesd: Path, rounds: int) -> list[str]:
    """The VAE decode against the tiny decoder on the same latents, A B A B, in the `cpu-fast`
    preset's precision and passes."""
    from sdaccel.engine.engine import Engine

    engines = {name: Engine(resolve_settings("cpu-fast", overrides=[
        "model_id=random:sd15", f"generation.height={size}", f"generation.width={size}", *extra],
        environ={}).settings) for name, extra in (("full VAE", []),
                                                  ("tiny", [f"tiny_decoder={taesd}"]))}
    latents = torch.randn(1, 4, size // 8, size // 8)
    times: dict[str, list[float]] = {name: [] for name in engines}
    with torch.inference_mode():
        for r in range(rounds + 1):  # the first round warms up, uncounted
            for name, engine in engines.items():
                start = time.perf_counter()
                engine.decode(latents)
                if r:
                    times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["full VAE"], times["tiny"], strict=True)]
    dtype = next(iter(engines.values())).settings.vae_dtype
    return [f"Decode alone at {size}x{size}, {dtype}, median of {rounds} paired rounds: full VAE "
            f"{statistics.median(times['full VAE']):.2f} s, tiny "
            f"{statistics.median(times['tiny']):.2f} s, {statistics.median(ratios):.1f}x."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        lora, taesd = Path(folder) / "lcm-lora-sdv1-5.safetensors", Path(folder) / (
            "taesd_decoder.safetensors")
        params = write_lcm_lora_like(lora)
        write_taesd_like(taesd)
        print(f"LCM-LoRA stand-in: {params / 1e6:.1f} M parameters, "
              f"{lora.stat().st_size / 1e6:.0f} MB", flush=True)
        report = benchmark(rows(args.size, lora, taesd), ["a photo of a cat"],
                           iters=args.iters, warmup=args.warmup, reference="cpu",
                           baselines=False)
        Console(width=200).print(report.table())
        for line in decode_alone(args.size, taesd, rounds=args.iters):
            print(line)


if __name__ == "__main__":
    main()
