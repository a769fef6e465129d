"""How long a LoRA switch takes, and whether it recompiles: one engine, the set changed between
batches (A, B, none, A, B, none), each switch timed and dynamo's compiled graphs counted.

    python examples/lora_switch.py                          # bundled:shapes + ring LoRAs, eager
    python examples/lora_switch.py --compile                # the same with torch.compile (inductor)
    python examples/lora_switch.py --model random:sd15 --synthetic-rank 32 --steps 1
        # SD 1.5's full-size UNet and text encoder (random weights), two made-up kohya LoRAs of
        # rank 32 on every attention, feed-forward and projection layer of the UNet and text
        # encoder (38 MB each in fp16, a common size on civitai)

A switch is `Engine.generate(..., loras=...)` with a set other than the one in force: the first
use of a file includes reading it (diffusers' conversion, PEFT layers built and checked); later
uses only write weights (original + weight x delta, in place). Prints one line per batch and a
JSON summary (--json FILE writes it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sdaccel.engine.engine import Engine
from sdaccel.settings import LoraEntry, resolve_settings
from sdaccel.shapes import BUNDLED_DIR

LORAS = BUNDLED_DIR.parent / "loras"


def synthetic_loras(engine: Engine, rank: int, folder: Path) -> list[Path]:
    """Two kohya-format LoRAs (random factors, fp16) on every Linear / 1x1 conv of the UNet's
    transformer blocks and the text encoder's attention and MLP, as kohya's trainer targets."""
    from safetensors.torch import save_file

    paths = []
    for n in range(2):
        gen = torch.Generator().manual_seed(n)
        tensors: dict[str, torch.Tensor] = {}
        for prefix, model, inside in (("lora_unet", engine.unet, ".attentions."),
                                      ("lora_te", engine.text_encoder, "layers.")):
            for name, module in model.named_modules():
                if inside not in name or not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                    continue
                if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1):
                    continue
                weight = module.weight
                key = name if prefix == "lora_unet" or name.startswith("text_model.") \
                    else f"text_model.{name}"
                key = f"{prefix}_{key.replace('.', '_')}"
                down = torch.randn((rank, *weight.shape[1:]), generator=gen) * 0.01
                up = torch.randn((weight.shape[0], rank, *weight.shape[2:]), generator=gen) * 0.01
                tensors[f"{key}.lora_down.weight"] = down.half()
                tensors[f"{key}.lora_up.weight"] = up.half()
                tensors[f"{key}.alpha"] = torch.tensor(float(rank)).half()
        path = folder / f"synthetic_{n}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="bundled:shapes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", help="unet_dtype and text_encoder_dtype")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=None, help="height = width (default: preset's)")
    p.add_argument("--compile", action="store_true", help="compile.enabled (mode: --mode)")
    p.add_argument("--mode", default="default", help="compile.mode")
    p.add_argument("--synthetic-rank", type=int, default=0,
                   help="use two made-up LoRAs of this rank instead of the ring ones")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    overrides = [f"model_id={args.model}", f"device={args.device}",
                 f"unet_dtype={args.dtype}", f"text_encoder_dtype={args.dtype}",
                 f"sampler.steps={args.steps}", f"compile.enabled={str(args.compile).lower()}",
                 f"compile.mode={args.mode}"]
    if args.size:
        overrides += [f"generation.height={args.size}", f"generation.width={args.size}"]
    settings = resolve_settings("tiny", overrides=overrides, environ={}).settings
    engine = Engine(settings)
    folder = Path(tempfile.mkdtemp(prefix="lora-switch-"))
    if args.synthetic_rank:
        files = synthetic_loras(engine, args.synthetic_rank, folder)
    else:
        files = [LORAS / "ring.safetensors", LORAS / "ring_diffusers.safetensors"]
    sets = {"A": [LoraEntry(path=files[0], weight=1.0)],
            "B": [LoraEntry(path=files[1], weight=0.5)], "none": []}
    counters = torch._dynamo.utils.counters
    prompt = "a red ring on a blue background"

    started = time.perf_counter()
    engine.generate([prompt], loras=[])  # the first call compiles (when compiling)
    first_call = time.perf_counter() - started
    graphs = counters["stats"]["unique_graphs"]
    rows = []
    for round_ in range(args.rounds):
        for name in ("A", "B", "none"):
            before = engine.lora.switches
            started = time.perf_counter()
            engine.generate([prompt], loras=sets[name])
            batch = time.perf_counter() - started
            switched = engine.lora.switches > before
            rows.append({"round": round_, "set": name, "switched": switched,
                         "switch_seconds": round(engine.lora.last_switch_seconds, 4)
                         if switched else 0.0,
                         "batch_seconds": round(batch, 3),
                         "new_graphs": counters["stats"]["unique_graphs"] - graphs})
            print(f"round {round_} -> {name:4s} switch {rows[-1]['switch_seconds']:.4f} s  "
                  f"batch {batch:.3f} s  graphs compiled since the first call: "
                  f"{rows[-1]['new_graphs']}", flush=True)
    later = [r["switch_seconds"] for r in rows if r["round"] > 0]
    summary = {
        "model": args.model, "device": args.device, "dtype": args.dtype,
        "compile": args.compile and args.mode, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda")
        else "cpu",
        "lora_bytes": [f.stat().st_size for f in files],
        "first_call_seconds": round(first_call, 2), "graphs_at_first_call": graphs,
        "first_use_switch_seconds": [r["switch_seconds"] for r in rows if r["round"] == 0],
        "later_switch_seconds": later,
        "recompiles_after_first_call": rows[-1]["new_graphs"],
        "originals_kept_bytes": engine.lora.originals_bytes,
        "unet_bytes": sum(p.numel() * p.element_size() for p in engine.unet.parameters()),
        "rows": rows,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
