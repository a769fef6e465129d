"""Train a LoRA that teaches ``bundled:shapes`` a shape it never saw: a ring.

Usage::

    python -m sdaccel.training.train_lora --out src/sdaccel/bundled/loras   # ~10 min, 2 CPU cores
    python -m sdaccel.training.train_lora --out /tmp/lora-smoke --smoke     # seconds: a check

The bundled model knows four shapes (circle, square, triangle, star); its tokenizer splits "ring"
into the pieces ``ri n g``, and without a LoRA "a red ring" comes out as a filled shape. The LoRA
(PEFT, rank 4, alpha 2, so a scale of 0.5 that a loader must read from the file) is trained on
the frozen model:

1. data: ``--n-images`` procedural images (:mod:`sdaccel.shapes.dataset`), half of them the
   data set's own scenes with their captions (so the other shapes stay as they were), half the
   same kind of scenes with rings (medium or big: the VAE keeps a small ring's hole only now and
   then), captioned "a red ring on a blue background", "two green rings", ... (captions longer
   than the model's 16 tokens are drawn again); every image encoded once by the frozen VAE;
2. LoRA layers on the UNet's transformer blocks (attention q/k/v/out, feed-forward, proj_in /
   proj_out, which are 1x1 convolutions here) and on the text encoder's attention and MLP;
   the bundled model's own loss (epsilon, min-SNR(5), noise offset 0.1, 10% empty captions),
   AdamW with warm-up and cosine decay, until ``--steps`` or ``--minutes``;
3. saved twice, the same tensors (fp16) in the two formats people have:
   ``ring.safetensors``, kohya/AUTOMATIC1111 keys (``lora_unet_..._to_q.lora_down.weight``,
   ``lora_up``, ``alpha``; ``lora_te_text_model_...``), and ``ring_diffusers.safetensors``,
   diffusers/PEFT keys (``unet....to_q.lora_A.weight``, ``text_encoder.text_model....``) with
   diffusers' adapter metadata (rank, alpha); plus ``ring.json``: the command, settings, times,
   loss curve and an evaluation (does "a red ring ..." have a hole, in the asked colour and on the
   asked background, with and without the LoRA; are the known shapes still right with it).

Why a shape and not a colour: the bundled VAE, trained on six colours, gives an orange shape
back as orange in only 8 of 24 round trips (yellow or red otherwise), so no LoRA of the UNet and
text encoder could draw orange reliably; it keeps a ring's hole in 16 of 16.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdaccel.shapes import BUNDLED_DIR, dataset, judge
from sdaccel.training import train

log = logging.getLogger("sdaccel.training.train_lora")

NEW_SHAPE = "ring"
# ModelSpec's field for the words a LoRA teaches: loaders, and sdaccel's unknown-word warning,
# read it from the file
TRIGGER_PHRASE = {"modelspec.trigger_phrase": f"{NEW_SHAPE}, {NEW_SHAPE}s"}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
EVAL_PAIRS = (("red", "blue"), ("yellow", "purple"), ("green", "white"), ("blue", "yellow"),
              ("purple", "green"), ("white", "red"), ("red", "yellow"), ("blue", "white"))
KNOWN_SHAPE_PROMPTS = ("a red circle on a blue background", "a yellow star on a purple background",
                       "a green square on a white background",
                       "a blue triangle on a yellow background")


@dataclass
class LoraTrainConfig:
    out: str
    name: str = NEW_SHAPE
    seed: int = 0
    threads: int = 2
    n_images: int = 4000
    rank: int = 4
    alpha: float = 2.0
    steps: int = 600
    minutes: float = 60.0  # a cap only: the steps decide, so a busy machine gives the same files
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 20
    uncond_prob: float = 0.1
    noise_offset: float = 0.1
    eval_steps: int = 20
    eval_guidance: float = 4.0
    log_every: int = 25
    smoke: bool = False


def ring_scene(rng: random.Random) -> dataset.Scene:
    """A data-set scene with rings instead of its shape, medium or big."""
    scene = dataset.sample_scene(rng)
    size = "medium" if scene.size == "small" else scene.size
    return replace(scene, shape=NEW_SHAPE, size=size, state_size=size != "medium")


def make_data(n: int, seed: int, tokenizer) -> tuple[torch.Tensor, list[str]]:
    """n images and captions: even indices the data set's own, odd ones rings."""
    images = np.empty((n, dataset.IMAGE_SIZE, dataset.IMAGE_SIZE, 3), dtype=np.uint8)
    captions: list[str] = []
    for i in range(n):
        if i % 2 == 0:
            image, text, _ = dataset.example(i // 2, seed)
        else:
            rng = random.Random(f"lora/{NEW_SHAPE}/{seed}/{i}")
            while True:
                scene = ring_scene(rng)
                text = dataset.caption(scene)
                if len(tokenizer.tokenize(text)) + 2 <= tokenizer.model_max_length:
                    break
            image = dataset.render(scene, rng)
        images[i] = np.asarray(image)
        captions.append(text)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def load_bundled():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(BUNDLED_DIR / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(BUNDLED_DIR / "text_encoder"),
                                                 dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(str(BUNDLED_DIR / "vae"), torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(str(BUNDLED_DIR / "unet"),
                                                torch_dtype=torch.float32)
    for model in (text_encoder, vae, unet):
        model.eval().requires_grad_(False)
    return tokenizer, text_encoder, vae, unet


def lora_configs(cfg: LoraTrainConfig):
    from peft import LoraConfig

    def config(targets: list[str]) -> LoraConfig:
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                          target_modules=targets)

    return config(UNET_TARGETS), config(TEXT_TARGETS)


def train_lora(cfg: LoraTrainConfig, tokenizer, text_encoder, unet, means, stds, captions,
               scaling: float, gen: torch.Generator) -> dict:
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**train.SCHEDULER_CONFIG)
    acp = noise_sched.alphas_cumprod
    snr = acp / (1 - acp)
    weight = snr.clamp(max=5.0) / snr  # min-SNR(5), epsilon prediction: as the base model
    ids = train.tokenize(tokenizer, captions)
    empty = train.tokenize(tokenizer, [""])[0]
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    budget = train.Budget(cfg.steps, cfg.minutes)
    n = means.shape[0]
    unet.train()
    text_encoder.train()

    def loss_of(progress: float) -> torch.Tensor:
        idx = torch.randint(0, n, (cfg.batch,), generator=gen)
        batch_ids = ids[idx].clone()
        batch_ids[torch.rand(cfg.batch, generator=gen) < cfg.uncond_prob] = empty
        cond = text_encoder(batch_ids)[0]
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling
        noise = torch.randn(z.shape, generator=gen)
        noise += cfg.noise_offset * torch.randn(z.shape[:2] + (1, 1), generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch,),
                          generator=gen)
        pred = unet(noise_sched.add_noise(z, noise, t), t, cond).sample
        return (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight[t]).mean()

    step, losses = train.train_loop("lora", cfg, params, opt, budget, cfg.lr, cfg.warmup,
                                     loss_of)
    unet.eval()
    text_encoder.eval()
    curve = [round(float(np.mean(losses[i: i + 50])), 4) for i in range(0, len(losses), 50)]
    return {"steps": step, "seconds": round(budget.elapsed(), 1),
            "trainable_params": sum(p.numel() for p in params),
            "final_loss": round(float(np.mean(losses[-50:])), 4), "loss_per_50_steps": curve}


# --------------------------------------------------------------------------- saving


def peft_state_dicts(unet, text_encoder) -> tuple[dict, dict]:
    """The LoRA tensors (fp16) in PEFT's naming: UNet module paths, and the text encoder's with
    `text_model.` (transformers 5's CLIPTextModel has no such level; files keep it so that
    every diffusers and transformers version reads them)."""
    from peft.utils import get_peft_model_state_dict

    unet_sd = {k: v.to(torch.float16).contiguous()
               for k, v in get_peft_model_state_dict(unet).items()}
    text_sd = {(k if k.startswith("text_model.") else f"text_model.{k}"):
               v.to(torch.float16).contiguous()
               for k, v in get_peft_model_state_dict(text_encoder).items()}
    return unet_sd, text_sd


def kohya_state_dict(unet_sd: dict, text_sd: dict, alpha: float) -> dict:
    """kohya/AUTOMATIC1111 keys for the same tensors: `lora_unet_<path with _>.lora_down.weight`
    (PEFT's lora_A), `.lora_up.weight` (lora_B) and `.alpha`; the text encoder's `lora_te_`
    (SD 1.x's single text encoder; SDXL's are lora_te1_/lora_te2_)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, sd in (("lora_unet", unet_sd), ("lora_te", text_sd)):
        for key, value in sd.items():
            module, _, kind = key.rpartition(".lora_")
            name = f"{prefix}_{module.replace('.', '_')}"
            part = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[kind]
            out[f"{name}.{part}"] = value
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=value.dtype)
    return out


def save(cfg: LoraTrainConfig, unet, text_encoder, unet_config, text_config,
         command: str) -> dict[str, str]:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from safetensors.torch import save_file

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    unet_sd, text_sd = peft_state_dicts(unet, text_encoder)
    diffusers_name = f"{cfg.name}_diffusers.safetensors"
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(out), unet_lora_layers=unet_sd, text_encoder_lora_layers=text_sd,
        weight_name=diffusers_name, unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict())
    add_metadata(out / diffusers_name, TRIGGER_PHRASE)
    kohya_name = f"{cfg.name}.safetensors"
    save_file(kohya_state_dict(unet_sd, text_sd, cfg.alpha), str(out / kohya_name), metadata={
        "ss_network_module": "networks.lora", "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": f"{cfg.alpha:g}", "ss_output_name": cfg.name,
        "ss_base_model_version": "sd_v1", "sdaccel_base_model": "bundled:shapes",
        "sdaccel_command": command, **TRIGGER_PHRASE})
    return {"kohya": kohya_name, "diffusers": diffusers_name}


def add_metadata(path: Path, extra: dict[str, str]) -> None:
    """Add keys to a .safetensors file's metadata; the tensors stay byte for byte the same."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    save_file(tensors, str(path), metadata={**metadata, **extra})


# --------------------------------------------------------------------------- evaluation


def ring_drawn(image, colour: str, background: str) -> bool:
    """A ring as asked: a shape with a hole (judge.has_hole), in the colour, on the background."""
    reading = judge.read(image)
    return bool(judge.has_hole(image)) and reading.colour == colour and \
        reading.background == (background,)


@torch.no_grad()
def evaluate(cfg: LoraTrainConfig, tokenizer, text_encoder, vae, unet) -> dict:
    """The LoRA's own check: "a <colour> ring on a <background> background" (8 pairs x 2 seeds)
    with and without it, and four known-shape prompts with it (are they still right?)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from diffusers.loaders.lora_base import (
        disable_lora_for_text_encoder,
        enable_lora_for_text_encoder,
    )

    scheduler = DPMSolverMultistepScheduler.from_pretrained(str(BUNDLED_DIR / "scheduler"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pairs = [pair for pair in EVAL_PAIRS for _ in range(2)][: 2 if cfg.smoke else None]
    prompts = [f"a {colour} {NEW_SHAPE} on a {bg} background" for colour, bg in pairs]

    def draw(texts: list[str]) -> list:
        gens = [torch.Generator().manual_seed(k) for k in range(len(texts))]
        return pipe(texts, num_inference_steps=2 if cfg.smoke else cfg.eval_steps,
                    guidance_scale=cfg.eval_guidance, generator=gens).images

    def rings(images) -> list[bool]:
        return [ring_drawn(image, c, bg) for image, (c, bg) in zip(images, pairs, strict=True)]

    with_lora = draw(prompts)
    known = draw(list(KNOWN_SHAPE_PROMPTS))
    aligned = [judge.score(i, t).aligned for i, t in zip(known, KNOWN_SHAPE_PROMPTS, strict=True)]
    unet.disable_adapters()
    disable_lora_for_text_encoder(text_encoder)
    try:
        without = draw(prompts)
    finally:
        unet.enable_adapters()
        enable_lora_for_text_encoder(text_encoder)
    return {
        "prompts": prompts, "seeds": list(range(len(prompts))),
        "rings_with_lora": sum(rings(with_lora)) / len(prompts),
        "rings_without_lora": sum(rings(without)) / len(prompts),
        "holes_with_lora": sum(bool(judge.has_hole(i)) for i in with_lora) / len(prompts),
        "holes_without_lora": sum(bool(judge.has_hole(i)) for i in without) / len(prompts),
        "known_shapes_aligned_with_lora": f"{sum(aligned)} of {len(known)}",
    }


def run(cfg: LoraTrainConfig, command: str = "") -> dict:
    from peft import inject_adapter_in_model

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    started = time.perf_counter()
    report: dict = {"command": command, "config": asdict(cfg)}
    tokenizer, text_encoder, vae, unet = load_bundled()

    t0 = time.perf_counter()
    images, captions = make_data(cfg.n_images, cfg.seed, tokenizer)
    means, stds = train.encode_all(vae, images)
    report["data"] = {"images": len(captions), NEW_SHAPE: sum(NEW_SHAPE in c for c in captions),
                      "seconds": round(time.perf_counter() - t0, 1)}
    log.info("data: %s", report["data"])

    unet_config, text_config = lora_configs(cfg)
    unet.add_adapter(unet_config)
    # PEFT directly: transformers 5's own add_adapter wants a PEFT release (0.22) not out yet
    inject_adapter_in_model(text_config, text_encoder)
    report["train"] = train_lora(cfg, tokenizer, text_encoder, unet, means, stds, captions,
                                 float(vae.config.scaling_factor), gen)
    log.info("lora: %d steps in %.0f s, final loss %.4f", report["train"]["steps"],
             report["train"]["seconds"], report["train"]["final_loss"])
    report["files"] = save(cfg, unet, text_encoder, unet_config, text_config, command)
    report["bytes"] = {kind: (Path(cfg.out) / name).stat().st_size
                       for kind, name in report["files"].items()}
    t0 = time.perf_counter()
    report["eval"] = evaluate(cfg, tokenizer, text_encoder, vae, unet)
    report["eval"]["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("eval: rings as asked %.0f%% with the LoRA, %.0f%% without; known shapes %s",
             100 * report["eval"]["rings_with_lora"], 100 * report["eval"]["rings_without_lora"],
             report["eval"]["known_shapes_aligned_with_lora"])
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    report["torch"] = torch.__version__
    (Path(cfg.out) / f"{cfg.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def parse_config(config_class, prog: str, description: str, argv: list[str] | None):
    """A trainer's config dataclass from its command line: `--out` (required) and one flag per
    other field, typed by its default (a bool is a switch); `--smoke` shrinks every stage."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--out", required=True, help="folder for the LoRA files")
    defaults = config_class(out="")
    for f in fields(config_class):
        value = getattr(defaults, f.name)
        if f.name == "out":
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            p.add_argument(flag, action="store_true")
        else:
            p.add_argument(flag, type=type(value), default=value)
    cfg = config_class(**vars(p.parse_args(argv)))
    if cfg.smoke:  # a few steps of everything: seconds
        cfg.n_images, cfg.steps, cfg.batch, cfg.log_every = 16, 2, 4, 1
    return cfg


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = sys.argv[1:] if argv is None else argv
    cfg = parse_config(LoraTrainConfig, "python -m sdaccel.training.train_lora",
                       __doc__.split("\n")[0], argv)
    return run(cfg, "python -m sdaccel.training.train_lora " + " ".join(args))


if __name__ == "__main__":
    main()
