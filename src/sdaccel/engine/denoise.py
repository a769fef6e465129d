"""The denoising loop: classifier-free guidance over a scheduler's plan, one event per step.

It mirrors StableDiffusionPipeline.__call__ step for step (that is the correctness contract),
with one deliberate difference that only shows at reduced precision: latents and the scheduler's
arithmetic stay in fp32 while the UNet runs in its own dtype, so a bf16 UNet does not also round
every solver update to bf16.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch


def step_kwargs(scheduler: Any, generators: Sequence[torch.Generator]) -> dict[str, Any]:
    """The per-step extras this scheduler takes: its noise generators, and eta=0 for DDIM."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = list(generators)
    return kwargs


def denoise(
    unet: Callable[..., Any],
    unet_dtype: torch.dtype,
    scheduler: Any,
    latents: torch.Tensor,
    embeddings: torch.Tensor,
    guidance_scale: float,
    generators: Sequence[torch.Generator],
    on_step: Callable[[int, int], None],
) -> torch.Tensor:
    """Run every timestep of `scheduler` from `latents` (fp32, already scaled by the scheduler's
    init_noise_sigma). `embeddings` holds [unconditional; conditional] when guidance is on, else
    the conditional embeddings alone; that choice was made by whoever encoded the prompts.
    """
    guided = embeddings.shape[0] == 2 * latents.shape[0]
    extra = step_kwargs(scheduler, generators)
    timesteps = scheduler.timesteps
    for index, t in enumerate(timesteps):
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t).to(unet_dtype)
        noise = unet(model_input, t, encoder_hidden_states=embeddings, return_dict=False)[0]
        noise = noise.float()
        if guided:
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
        on_step(index + 1, len(timesteps))
    return latents
