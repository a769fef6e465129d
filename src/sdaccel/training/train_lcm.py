"""Distil ``bundled:shapes`` into a few-step model: an LCM LoRA, by consistency distillation.

Usage::

    python -m sdaccel.training.train_lcm --out src/sdaccel/bundled/loras   # the shipped run
    python -m sdaccel.training.train_lcm --out /tmp/lcm-smoke --smoke      # seconds: a check

The published recipe (Luo et al. 2023, "LCM-LoRA"; diffusers'
``examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py``), at toy scale:

- the **teacher** is the frozen bundled UNet; the **student** is the same UNet with a LoRA on
  every linear and convolution layer of its blocks (the teacher is the student with the LoRA
  switched off, so only one UNet is in memory);
- the **teacher solver** is 50-step DDIM: a training step draws one of its 50 timesteps
  t_{n+k} (k = 1000 / 50 = 20, the skipping interval), noises a training image to it, and runs
  one guided DDIM step to t_n. The guidance scale w is drawn per image from [w_min, w_max]
  (Imagen's convention: diffusers' guidance_scale = w + 1);
- the **consistency function** is f(x, t) = c_skip(t) x + c_out(t) x0(x, t), with LCM's boundary
  scalings (sigma_data 0.5, timestep scaling 10), so that f is the identity at t = 0;
- the **target** is the student's own prediction at the teacher's point (x_{t_n}, t_n), under
  no_grad (no EMA copy: the LoRA variant), and the loss is the pseudo-Huber
  sqrt(d^2 + c^2) - c with c = 0.001, gradients clipped at 1.

Sampling uses diffusers' ``LCMScheduler`` (``sampler.name: lcm``) at guidance 1 (no
unconditional pass): the guidance is distilled in. The run writes ``<name>.safetensors``
(kohya / AUTOMATIC1111 keys), ``<name>_diffusers.safetensors`` (diffusers / PEFT keys) and
``<name>.json`` (command, settings, loss curve, and the alignment of the held-out captions at 1,
2, 4 and 8 LCM steps, judged by ``sdaccel.shapes.judge``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from sdaccel.shapes import BUNDLED_DIR, dataset, judge
from sdaccel.training import train, train_lora

log = logging.getLogger("sdaccel.training.train_lcm")

# Every linear and convolution layer of the UNet's blocks, as the published LCM-LoRA targets.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                "upsamplers.0.conv", "time_emb_proj"]
TEACHER_STEPS = 50  # the DDIM solver's grid: skipping interval k = 1000 / 50
SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0  # LCMScheduler's default: the boundary scalings must match it
EVAL_STEPS = (1, 2, 4, 8)
EVAL_SEEDS = (1000, 2000)  # examples/yardstick.py's: caption k of the held-out set gets seed + k


@dataclass
class LcmTrainConfig:
    out: str
    name: str = "lcm"
    seed: int = 0
    threads: int = 2
    n_images: int = 8000
    rank: int = 16
    alpha: float = 16.0
    steps: int = 1000
    minutes: float = 60.0  # a cap only: the steps decide, so a busy machine gives the same files
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 50
    w_min: float = 2.0  # Imagen convention; the teacher's best is diffusers' guidance 3-4
    w_max: float = 3.5
    huber_c: float = 0.001
    log_every: int = 25
    smoke: bool = False


class DDIMSolver:
    """The teacher's 50-step DDIM grid and its deterministic step from t_{n+k} to t_n."""

    def __init__(self, alphas_cumprod: torch.Tensor, steps: int = TEACHER_STEPS):
        ratio = len(alphas_cumprod) // steps
        self.timesteps = torch.arange(1, steps + 1) * ratio - 1  # 19, 39, ..., 999
        self.interval = ratio
        self.alpha = alphas_cumprod[self.timesteps]
        self.alpha_prev = torch.cat([alphas_cumprod[:1], self.alpha[:-1]])

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        alpha_prev = self.alpha_prev[index].view(-1, 1, 1, 1)
        return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's c_skip(t), c_out(t): f(x, 0) = x exactly, the consistency boundary condition."""
    scaled = TIMESTEP_SCALING * t.float()
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def predicted_x0(eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                 alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def distil(cfg: LcmTrainConfig, unet, states, caption_index, empty_state, means, stds,
           scaling: float, gen: torch.Generator) -> dict:
    """The consistency-distillation loop; the LoRA (already on `unet`) is what learns."""
    from diffusers import DDPMScheduler

    acp = DDPMScheduler(**train.SCHEDULER_CONFIG).alphas_cumprod
    solver = DDIMSolver(acp)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    budget = train.Budget(cfg.steps, cfg.minutes)
    n = means.shape[0]
    unet.train()

    def consistency(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c_skip, c_out = boundary_scalings(t)
        return c_skip * x + c_out * predicted_x0(unet(x, t, cond).sample, x, t, acp)

    def loss_of(progress: float) -> torch.Tensor:
        idx = torch.randint(0, n, (cfg.batch,), generator=gen)
        cond = states[caption_index[idx]]
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling
        index = torch.randint(0, TEACHER_STEPS, (cfg.batch,), generator=gen)
        start = solver.timesteps[index]
        end = (start - solver.interval).clamp(min=0)
        a = acp[start].view(-1, 1, 1, 1)
        x_start = a.sqrt() * z + (1 - a).sqrt() * torch.randn(z.shape, generator=gen)
        w = (cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(cfg.batch, generator=gen))
        w = w.view(-1, 1, 1, 1)
        prediction = consistency(x_start, start, cond)
        with torch.no_grad():
            unet.disable_adapters()  # the teacher: the frozen model, guided at w
            try:
                eps_c, eps_u = unet(torch.cat([x_start] * 2), torch.cat([start] * 2),
                                    torch.cat([cond, empty_state.expand_as(cond)])
                                    ).sample.chunk(2)
            finally:
                unet.enable_adapters()
            x0_c, x0_u = (predicted_x0(e, x_start, start, acp) for e in (eps_c, eps_u))
            x_end = solver.step(x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u), index)
            target = consistency(x_end, end, cond)
        d2 = (prediction.float() - target.float()) ** 2
        return (torch.sqrt(d2 + cfg.huber_c**2) - cfg.huber_c).mean()

    step, losses = train.train_loop("lcm", cfg, params, opt, budget, cfg.lr, cfg.warmup,
                                     loss_of)
    unet.eval()
    curve = [round(float(np.mean(losses[i: i + 50])), 5) for i in range(0, len(losses), 50)]
    return {"steps": step, "seconds": round(budget.elapsed(), 1),
            "trainable_params": sum(p.numel() for p in params),
            "final_loss": round(float(np.mean(losses[-50:])), 5), "loss_per_50_steps": curve}


@torch.no_grad()
def evaluate(tokenizer, text_encoder, vae, unet, smoke: bool = False) -> dict:
    """Alignment on the held-out captions x EVAL_SEEDS at each of EVAL_STEPS LCM steps,
    guidance 1, through diffusers' own pipeline and LCMScheduler."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    scheduler = LCMScheduler.from_pretrained(str(BUNDLED_DIR / "scheduler"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    captions = dataset.held_out_captions()[: 2 if smoke else None]
    out = {}
    for steps in EVAL_STEPS[: 1 if smoke else None]:
        images, texts = [], []
        for seed in EVAL_SEEDS:
            gens = [torch.Generator().manual_seed(seed + k) for k in range(len(captions))]
            images += pipe(captions, num_inference_steps=steps, guidance_scale=1.0,
                           generator=gens, height=64, width=64).images
            texts += captions
        aligned = [judge.score(i, t).aligned for i, t in zip(images, texts, strict=True)]
        out[f"{steps} steps"] = round(sum(aligned) / len(aligned), 4)
        log.info("eval: %d LCM steps, %.1f%% aligned", steps, 100 * out[f"{steps} steps"])
    return {"captions": len(captions), "seeds": list(EVAL_SEEDS), "aligned": out}


def tag_frequency(captions: list[str]) -> dict[str, str]:
    """kohya's `ss_tag_frequency` for the training captions' words: the LoRA teaches no new
    word, and a file that says so keeps the unknown-word warning plain (engine/lora/files.py)."""
    counts = Counter(word for text in captions for word in text.split())
    return {"ss_tag_frequency": json.dumps({"shapes": dict(sorted(counts.items()))})}


def save(cfg: LcmTrainConfig, unet, unet_config, captions: list[str],
         command: str) -> dict[str, str]:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    unet_sd = {k: v.to(torch.float16).contiguous()
               for k, v in get_peft_model_state_dict(unet).items()}
    diffusers_name = f"{cfg.name}_diffusers.safetensors"
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        str(out), unet_lora_layers=unet_sd, weight_name=diffusers_name,
        unet_lora_adapter_metadata=unet_config.to_dict())
    train_lora.add_metadata(out / diffusers_name, tag_frequency(captions))
    kohya_name = f"{cfg.name}.safetensors"
    save_file(train_lora.kohya_state_dict(unet_sd, {}, cfg.alpha), str(out / kohya_name),
              metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.rank),
                        "ss_network_alpha": f"{cfg.alpha:g}", "ss_output_name": cfg.name,
                        "ss_base_model_version": "sd_v1",
                        "sdaccel_base_model": "bundled:shapes",
                        "sdaccel_sampler": "lcm, 2-8 steps, guidance 1",
                        "sdaccel_command": command, **tag_frequency(captions)})
    return {"kohya": kohya_name, "diffusers": diffusers_name}


def run(cfg: LcmTrainConfig, command: str = "") -> dict:
    from peft import LoraConfig

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    started = time.perf_counter()
    report: dict = {"command": command, "config": asdict(cfg)}
    tokenizer, text_encoder, vae, unet = train_lora.load_bundled()

    t0 = time.perf_counter()
    images, captions = train.make_data(cfg.n_images, cfg.seed)
    with torch.no_grad():
        means, stds = train.encode_all(vae, images)
    states, caption_index = train.encode_captions(text_encoder, tokenizer, captions)
    empty_state = train.encode_captions(text_encoder, tokenizer, [""])[0][0]
    report["data"] = {"images": len(captions), "seconds": round(time.perf_counter() - t0, 1)}
    log.info("data: %s", report["data"])

    unet_config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian",
                             target_modules=UNET_TARGETS)
    unet.add_adapter(unet_config)
    report["train"] = distil(cfg, unet, states, caption_index, empty_state, means, stds,
                             float(vae.config.scaling_factor), gen)
    log.info("lcm: %d steps in %.0f s, final loss %.5f", report["train"]["steps"],
             report["train"]["seconds"], report["train"]["final_loss"])
    report["files"] = save(cfg, unet, unet_config, captions, command)
    report["bytes"] = {kind: (Path(cfg.out) / name).stat().st_size
                       for kind, name in report["files"].items()}
    t0 = time.perf_counter()
    report["eval"] = evaluate(tokenizer, text_encoder, vae, unet, cfg.smoke)
    report["eval"]["seconds"] = round(time.perf_counter() - t0, 1)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    report["torch"] = torch.__version__
    (Path(cfg.out) / f"{cfg.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = sys.argv[1:] if argv is None else argv
    cfg = train_lora.parse_config(LcmTrainConfig, "python -m sdaccel.training.train_lcm",
                                  __doc__.split("\n")[0], argv)
    return run(cfg, "python -m sdaccel.training.train_lcm " + " ".join(args))


if __name__ == "__main__":
    main()
