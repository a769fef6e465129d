"""Train the bundled ``shapes`` model: a small Stable-Diffusion-architecture pipeline, on the CPU.

Usage::

    python -m sdaccel.training.train --out src/sdaccel/bundled/shapes # full run, ~45 min, 2 cores
    python -m sdaccel.training.train --out /tmp/shapes-smoke --smoke  # seconds: train, save, reload

Stages (each logged with its wall time):

1. data: ``--n-train`` procedural images and captions (:mod:`sdaccel.shapes.dataset`), held-out
   triples excluded;
2. VAE: a small ``AutoencoderKL`` (64x64 RGB -> 16x16x4 latents), L1+MSE reconstruction loss,
   tiny KL weight, AdamW with warm-up, cosine decay and gradient clipping; on 32x32 crops (a
   quarter of the cost per step) then, for the last ``--vae-full-fraction``, whole images; then
   checked by the judge on its reconstructions of held-out images (the ceiling for any UNet);
3. latents: every training image encoded once (posterior mean and std); the VAE
   ``scaling_factor`` is set to 1 / RMS of the sampled latents (diffusers' 0.18215 is for SD's VAE);
4. text encoder: a 3-layer ``CLIPTextModel`` pre-trained on the training captions to read back
   every stated attribute (colour, shape, count, size, position, background) from its token
   states, then frozen, as SD's CLIP text encoder is. Trained jointly with the UNet instead, it
   let the position words collapse (their token states differed 20x less than a colour swap's)
   and the UNet never learnt "top left";
5. UNet: a small ``UNet2DConditionModel`` trained on epsilon prediction with min-SNR(5) loss
   weighting and offset noise (else the model reads the background from the starting noise's
   mean), 10% of captions replaced by the empty prompt (the pipeline's unconditional input for
   classifier-free guidance), an EMA of the weights, until ``--unet-steps`` or
   ``--unet-minutes`` is reached (learning-rate schedule follows whichever is nearer);
6. save: a standard diffusers folder (``StableDiffusionPipeline.save_pretrained``, safetensors,
   fp16 UNet/VAE weights unless ``--fp32``) with a ``DPMSolverMultistepScheduler``
   (DPM-Solver++) config on SD 1.x's noise schedule, ``vocabulary.txt`` (the grammar's words)
   and ``training.json`` with the run's settings, times and losses; then reloaded with
   ``from_pretrained`` and used to generate.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdaccel.engine.loading.models import VOCABULARY_FILE
from sdaccel.shapes import dataset
from sdaccel.training.tokenizer import MODEL_MAX_LENGTH, save_tokenizer

log = logging.getLogger("sdaccel.training.train")

# SD 1.x noise schedule; DDPM/DDIM/DPM-Solver++ are all built from this config.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
)


@dataclass
class TrainConfig:
    out: str
    seed: int = 0
    n_train: int = 30000
    threads: int = 2
    vae_steps: int = 4000
    vae_minutes: float = 10.0
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_crop: int = 32
    vae_full_fraction: float = 0.15
    text_steps: int = 1500
    text_minutes: float = 1.5
    text_batch: int = 256
    text_lr: float = 1e-3
    unet_steps: int = 6000
    unet_minutes: float = 30.5
    unet_batch: int = 32
    unet_lr: float = 8e-4
    uncond_prob: float = 0.1
    noise_offset: float = 0.1
    ema_decay: float = 0.998
    fp32: bool = False
    resume_from: str | None = None
    unet_warmup: int = 100
    smoke: bool = False
    log_every: int = 25


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=dataset.IMAGE_SIZE,
    )


def make_unet(latent_size: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=128,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _lr_factor(progress: float, step: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Budget:
    """Progress in [0, 1] as the larger of steps done / max steps and time spent / time budget."""

    def __init__(self, steps: int, minutes: float):
        self.steps, self.seconds, self.start = steps, minutes * 60, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def progress(self, step: int) -> float:
        return max(step / self.steps, self.elapsed() / self.seconds if self.seconds > 0 else 0.0)


def _log_progress(stage: str, step: int, recent: list[float], opt, budget: Budget) -> None:
    seconds = budget.elapsed()
    log.info(
        "%s step %d loss %.4f lr %.2e (%.0f s, %.2f s/step)",
        stage,
        step,
        float(np.mean(recent)),
        opt.param_groups[0]["lr"],
        seconds,
        seconds / step,
    )


def train_loop(stage: str, cfg: TrainConfig, params: list, opt, budget: Budget,
               base_lr: float, warmup: int, loss_of, clip: bool = True,
               after_step=None) -> tuple[int, list[float]]:
    """The loop every stage shares: warm-up then cosine learning rate, a step budget and a
    time budget, optional gradient clipping, logging. `loss_of(progress)` draws a batch and
    returns its loss; `after_step(step)` runs after each optimiser step (the UNet's EMA)."""
    step, losses = 0, []
    while step < budget.steps and budget.elapsed() < budget.seconds:
        progress = budget.progress(step)
        for group in opt.param_groups:
            group["lr"] = base_lr * _lr_factor(progress, step, warmup)
        loss = loss_of(progress)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if after_step is not None:
            after_step(step)
        losses.append(loss.item())
        step += 1
        if step % cfg.log_every == 0:
            _log_progress(stage, step, losses[-cfg.log_every :], opt, budget)
    return step, losses


def make_data(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    images = np.empty((n, dataset.IMAGE_SIZE, dataset.IMAGE_SIZE, 3), dtype=np.uint8)
    captions: list[str] = []
    for i, (img, text, _) in enumerate(dataset.examples(n, seed)):
        images[i] = np.asarray(img)
        captions.append(text)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def _random_crop(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """The same ``size`` square crop of every image, on the latent grid (multiples of 4 px)."""
    if size >= x.shape[-1]:
        return x
    last = (x.shape[-1] - size) // 4
    i, j = (4 * int(v) for v in torch.randint(0, last + 1, (2,), generator=gen))
    return x[:, :, i : i + size, j : j + size]


def train_vae(cfg: TrainConfig, images: torch.Tensor, gen: torch.Generator) -> tuple[object, dict]:
    vae = make_vae().train()
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vae_lr, weight_decay=0.0)
    budget = Budget(cfg.vae_steps, cfg.vae_minutes)
    n = images.shape[0]

    def loss_of(progress: float) -> torch.Tensor:
        x = _to_float(images[torch.randint(0, n, (cfg.vae_batch,), generator=gen)])
        if progress < 1.0 - cfg.vae_full_fraction:
            x = _random_crop(x, cfg.vae_crop, gen)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        return F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()

    step, losses = train_loop("vae", cfg, params, opt, budget, cfg.vae_lr, 30, loss_of)
    vae.eval()
    return vae, {
        "steps": step,
        "seconds": round(budget.elapsed(), 1),
        "final_loss": float(np.mean(losses[-50:])),
    }


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        post = vae.encode(_to_float(images[i : i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_check(vae, n: int = 108, seed: int = 0) -> dict:
    """Round-trip ``n`` held-out images through the VAE: PSNR, and what the judge reads back.

    The judge's alignment on reconstructions is the ceiling for any UNet on this VAE: a shape the
    VAE cannot draw, the pipeline cannot draw either.
    """
    from sdaccel.shapes import judge

    examples = list(dataset.examples(n, seed, held_out=True))
    images = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im, _, _ in examples])
    x = _to_float(images)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    psnr = 10 * torch.log10(1.0 / ((rec - x) / 2).pow(2).mean(dim=(1, 2, 3)))
    pixels = ((rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    read_back = judge.accuracy(list(pixels), [text for _, text, _ in examples])
    return {
        "held_out_psnr_db": round(float(psnr.mean()), 2),
        "held_out_judge_on_reconstructions": {k: round(v, 3) for k, v in read_back.items()},
    }


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """Exactly the pipeline's tokenisation: padded to the model's length."""
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


# What the text encoder is pre-trained to read back from a caption: one class per attribute,
# class 0 = "not stated" where the grammar lets a caption leave it out.
_ATTRIBUTE_CLASSES = {
    "count": 2,
    "colour": len(dataset.COLOURS),
    "shape": len(dataset.SHAPES),
    "size": 3,
    "position": 1 + len(dataset.POSITIONS),
    "background_top": 1 + len(dataset.COLOURS),
    "background_bottom": 1 + len(dataset.COLOURS),
}


def caption_labels(captions: list[str]) -> torch.Tensor:
    """The ``(n, 7)`` attribute classes of ``captions`` (columns as ``_ATTRIBUTE_CLASSES``)."""
    rows = []
    for text in captions:
        a = dataset.parse_caption(text)
        bg = a.get("background", ())
        rows.append(
            [
                a["count"] - 1,
                dataset.COLOURS.index(a["colour"]),
                dataset.SHAPES.index(a["shape"]),
                ("small", "big").index(a["size"]) + 1 if "size" in a else 0,
                dataset.POSITIONS.index(a["position"]) + 1 if "position" in a else 0,
                dataset.COLOURS.index(bg[0]) + 1 if bg else 0,
                dataset.COLOURS.index(bg[1]) + 1 if len(bg) == 2 else 0,
            ]
        )
    return torch.tensor(rows)


def _attribute_logits(heads, text_encoder, ids: torch.Tensor) -> list[torch.Tensor]:
    # The mean over all token states: what cross-attention can read, whichever tokens it picks.
    pooled = text_encoder(ids)[0].mean(dim=1)
    return [head(pooled) for head in heads]


def train_text_encoder(
    cfg: TrainConfig, tokenizer, captions: list[str], gen: torch.Generator
) -> tuple[object, dict]:
    """Pre-train the text encoder to read every stated attribute back from the training captions.

    Linear heads on the mean token state, one cross-entropy per attribute; the heads are thrown
    away. Scored on the held-out captions (never seen here): the UNet can only follow what the
    text encoder tells apart.
    """
    text_encoder = make_text_encoder(tokenizer).train()
    hidden = text_encoder.config.hidden_size
    heads = torch.nn.ModuleList(torch.nn.Linear(hidden, k) for k in _ATTRIBUTE_CLASSES.values())
    unique = sorted(set(captions))
    ids_all, labels_all = tokenize(tokenizer, unique), caption_labels(unique)
    params = list(text_encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.text_lr, weight_decay=1e-2)
    budget = Budget(cfg.text_steps, cfg.text_minutes)

    def loss_of(progress: float) -> torch.Tensor:
        idx = torch.randint(0, len(unique), (cfg.text_batch,), generator=gen)
        logits = _attribute_logits(heads, text_encoder, ids_all[idx])
        return sum(F.cross_entropy(lg, labels_all[idx, k]) for k, lg in enumerate(logits))

    step, losses = train_loop("text", cfg, params, opt, budget, cfg.text_lr, 50, loss_of,
                               clip=False)
    text_encoder.eval().requires_grad_(False)
    held = dataset.held_out_captions()
    with torch.no_grad():
        logits = _attribute_logits(heads, text_encoder, tokenize(tokenizer, held))
    labels = caption_labels(held)
    read_back = {
        name: round(float((lg.argmax(-1) == labels[:, k]).float().mean()), 3)
        for k, (name, lg) in enumerate(zip(_ATTRIBUTE_CLASSES, logits, strict=True))
    }
    return text_encoder, {
        "steps": step,
        "seconds": round(budget.elapsed(), 1),
        "unique_captions": len(unique),
        "final_loss": round(float(np.mean(losses[-50:])), 4),
        "held_out_attributes_read_back": read_back,
    }


@torch.no_grad()
def encode_captions(text_encoder, tokenizer, captions: list[str], batch: int = 1024):
    """Token states of every distinct caption once: ``(states, index of each caption)``."""
    unique = sorted(set(captions))
    position = {text: i for i, text in enumerate(unique)}
    states = torch.cat(
        [
            text_encoder(tokenize(tokenizer, unique[i : i + batch]))[0]
            for i in range(0, len(unique), batch)
        ]
    )
    return states, torch.tensor([position[text] for text in captions])


def train_unet(
    cfg: TrainConfig,
    tokenizer,
    means,
    stds,
    captions,
    scaling: float,
    gen: torch.Generator,
    text_encoder,
    unet=None,
):
    """Train the UNet on the frozen ``text_encoder``'s token states (computed once per caption)."""
    from diffusers import DDPMScheduler

    unet = (unet or make_unet(means.shape[-1])).train()
    noise_sched = DDPMScheduler(**SCHEDULER_CONFIG)
    acp = noise_sched.alphas_cumprod
    snr = acp / (1 - acp)
    weight = snr.clamp(max=5.0) / snr  # min-SNR(5), epsilon prediction

    states, caption_index = encode_captions(text_encoder, tokenizer, captions)
    empty_state = encode_captions(text_encoder, tokenizer, [""])[0][0]

    params = list(unet.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    budget = Budget(cfg.unet_steps, cfg.unet_minutes)
    n = means.shape[0]

    def loss_of(progress: float) -> torch.Tensor:
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=gen)
        cond = states[caption_index[idx]]
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.uncond_prob
        cond[drop] = empty_state
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling
        noise = torch.randn(z.shape, generator=gen)
        if cfg.noise_offset:  # lets the model set an image's mean colour from the caption
            noise += cfg.noise_offset * torch.randn(z.shape[:2] + (1, 1), generator=gen)
        t = torch.randint(
            0, noise_sched.config.num_train_timesteps, (cfg.unet_batch,), generator=gen
        )
        noisy = noise_sched.add_noise(z, noise, t)
        pred = unet(noisy, t, cond).sample
        return (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight[t]).mean()

    def update_ema(step: int) -> None:
        d = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, p in zip(ema, params, strict=True):
                average.mul_(d).add_(p.detach(), alpha=1 - d)

    step, losses = train_loop("unet", cfg, params, opt, budget, cfg.unet_lr, cfg.unet_warmup,
                               loss_of, after_step=update_ema)
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    unet.eval()
    curve = [round(float(np.mean(losses[i : i + 100])), 4) for i in range(0, len(losses), 100)]
    stats = {
        "steps": step,
        "seconds": round(budget.elapsed(), 1),
        "final_loss": float(np.mean(losses[-100:])),
        "loss_per_100_steps": curve,
    }
    return unet, stats


def save_pipeline(out: Path, vae, text_encoder, tokenizer, unet, fp32: bool) -> None:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler(
        **SCHEDULER_CONFIG, algorithm_type="dpmsolver++", solver_order=2
    )
    # As SD 1.x's config: DDIM/DDPM built from it with `from_config` must not clip the predicted
    # x0 to [-1, 1] (their default), which ruins latents; DDIM's last step uses alpha_0.
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # UNet and VAE weights in fp16 (half the size); diffusers loads them as fp32 unless told
    # otherwise. The text encoder stays fp32: transformers loads a model in its saved dtype, and an
    # fp16 text encoder beside fp32 UNet breaks a plain ``from_pretrained(path)``.
    halves = [] if fp32 else [unet, vae]
    for m in halves:
        m.to(torch.float16)
    pipe.save_pretrained(str(out), safe_serialization=True)
    for m in halves:
        m.to(torch.float32)
    # The words it knows, beside it: the engine warns of a prompt's other words (its
    # Components.vocabulary)
    (out / VOCABULARY_FILE).write_text("\n".join(dataset.vocabulary()) + "\n", encoding="utf-8")


def check_reload(out: Path, prompts: list[str], steps: int, guidance: float, seed: int):
    """Reload the folder exactly as a user would and generate ``prompts`` (fp32, CPU)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(out), torch_dtype=torch.float32, use_safetensors=True
    )
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images


def _first_parts(cfg: TrainConfig, out: Path, images, gen: torch.Generator, report: dict):
    """The tokenizer and a trained VAE; when resuming, a saved model's tokenizer, VAE, UNet and
    text encoder (the UNet trains on, the rest is kept). Returns (tokenizer, vae, text_encoder,
    unet), the last two None when they are still to be trained."""
    unet = text_encoder = None
    if cfg.resume_from:  # continue training a saved model's UNet; tokenizer, VAE, encoder kept
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        src = Path(cfg.resume_from)
        previous = src / "training.json"
        report["resumed_from"] = json.loads(previous.read_text()) if previous.exists() else {}
        tokenizer = CLIPTokenizer.from_pretrained(str(src / "tokenizer"))
        vae = AutoencoderKL.from_pretrained(str(src / "vae"), torch_dtype=torch.float32).eval()
        unet = UNet2DConditionModel.from_pretrained(str(src / "unet"), torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(str(src / "text_encoder"), dtype=torch.float32)
        text_encoder.eval().requires_grad_(False)
        report["vae"] = {"from": str(src)}
    else:
        tokenizer = save_tokenizer(out / "_tokenizer_check", MODEL_MAX_LENGTH)
        for f in (out / "_tokenizer_check").iterdir():
            f.unlink()
        (out / "_tokenizer_check").rmdir()
        vae, report["vae"] = train_vae(cfg, images, gen)
    report["vae"].update(vae_check(vae, seed=cfg.seed))
    log.info("vae: %s", report["vae"])
    return tokenizer, vae, text_encoder, unet


def _latents(cfg: TrainConfig, vae, images, gen: torch.Generator, report: dict):
    """Every image's latent mean and std under `vae`, and the scaling factor that gives the
    latents unit RMS (set on the VAE's config; a resumed VAE keeps its own)."""
    t0 = time.perf_counter()
    means, stds = encode_all(vae, images)
    sample = means + stds * torch.randn(means.shape, generator=gen)
    if cfg.resume_from:
        scaling = float(vae.config.scaling_factor)
    else:
        scaling = float(1.0 / sample.pow(2).mean().sqrt())
        vae.register_to_config(scaling_factor=scaling)
    report["latents"] = {
        "shape": list(means.shape[1:]),
        "scaling_factor": round(scaling, 5),
        "mean": round(float(sample.mean()), 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    log.info("latents: %s", report["latents"])
    return means, stds, scaling


def run(cfg: TrainConfig) -> dict:
    """Every stage of the module docstring, in order; returns the report (training.json)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    report: dict = {"config": asdict(cfg)}

    t0 = time.perf_counter()
    images, captions = make_data(cfg.n_train, cfg.seed)
    held = set(dataset.held_out_captions())
    assert not held & set(captions), "held-out caption in the training set"
    report["data"] = {"images": len(captions), "seconds": round(time.perf_counter() - t0, 1)}
    log.info("data: %d images in %.1f s", len(captions), time.perf_counter() - t0)

    tokenizer, vae, text_encoder, unet = _first_parts(cfg, out, images, gen, report)
    means, stds, scaling = _latents(cfg, vae, images, gen, report)
    del images

    if text_encoder is None:
        text_encoder, report["text_encoder"] = train_text_encoder(cfg, tokenizer, captions, gen)
        log.info("text encoder: %s", report["text_encoder"])
    unet, report["unet"] = train_unet(
        cfg, tokenizer, means, stds, captions, scaling, gen, text_encoder, unet
    )
    log.info(
        "unet: steps %d, %.0f s, final loss %.4f",
        report["unet"]["steps"],
        report["unet"]["seconds"],
        report["unet"]["final_loss"],
    )

    save_pipeline(out, vae, text_encoder, tokenizer, unet, cfg.fp32)
    report["params"] = {
        "unet": sum(p.numel() for p in unet.parameters()),
        "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
        "vae": sum(p.numel() for p in vae.parameters()),
    }
    report["bytes_on_disk"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")

    images_out = check_reload(
        out,
        ["a red circle on a blue background"],
        steps=2 if cfg.smoke else 20,
        guidance=7.5,
        seed=cfg.seed,
    )
    report["check_image_size"] = list(images_out[0].size)
    log.info("done in %.0f s; %d bytes on disk", report["total_seconds"], report["bytes_on_disk"])
    return report


def parse_args(argv: list[str] | None) -> TrainConfig:
    """The command line -> TrainConfig (its defaults: the shipped run)."""
    p = argparse.ArgumentParser(
        prog="python -m sdaccel.training.train", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, help="output diffusers folder")
    d = TrainConfig(out="")
    for name in (
        "seed",
        "n_train",
        "threads",
        "vae_steps",
        "vae_batch",
        "text_steps",
        "text_batch",
        "vae_crop",
        "unet_steps",
        "unet_batch",
        "unet_warmup",
        "log_every",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in (
        "vae_minutes",
        "vae_lr",
        "vae_full_fraction",
        "text_minutes",
        "text_lr",
        "unet_minutes",
        "unet_lr",
        "uncond_prob",
        "noise_offset",
        "ema_decay",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--fp32", action="store_true", help="save fp32 weights (default fp16)")
    p.add_argument(
        "--resume-from",
        default=None,
        help="continue training the UNet of this folder (tokenizer, VAE, text encoder kept)",
    )
    p.add_argument(
        "--smoke", action="store_true", help="a few steps of everything: seconds, for tests"
    )
    args = vars(p.parse_args(argv))
    cfg = TrainConfig(**args)
    if cfg.smoke:
        cfg.n_train, cfg.vae_steps, cfg.vae_batch, cfg.unet_steps, cfg.unet_batch = 64, 2, 4, 2, 4
        cfg.text_steps, cfg.text_batch, cfg.log_every = 2, 8, 1
    return cfg


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
