"""Where a batch starts: noise (text to image), an image's latents noised to the strength's
timestep (image to image), and the same with a mask (inpainting), each made as diffusers'
StableDiffusionPipeline, StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline make
them, draw for draw from each image's own generator, so the images are theirs.

An inpainting checkpoint (a UNet with 9 input channels) reads the mask and the masked image's
latents beside the latents at every step (`Start.extra`, which the guider appends to the UNet's
input). An ordinary checkpoint is inpainted by blending: after every step the area to keep is
put back as the original image's latents noised to the next timestep (`Start.blend`, run as a
per-step callback).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdaccel.engine.sampling.loop import StepState

Blend = Callable[[StepState], torch.Tensor]


@dataclass
class Start:
    """The latents a batch starts from, the index of the plan it starts at, and what inpainting
    adds to the loop."""

    latents: torch.Tensor
    begin: int = 0  # the first entry of scheduler.timesteps to run
    extra: torch.Tensor | None = None  # channels appended to the UNet's input (9-channel UNet)
    blend: Blend | None = None  # after each step (ordinary UNet inpainting)


def strength_begin(scheduler, steps: int, strength: float) -> int:
    """The entry of scheduler.timesteps a start at `strength` begins at: the last
    strength x steps of the plan run (diffusers' get_timesteps)."""
    run = min(int(steps * strength), steps)
    begin = max(steps - run, 0) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return begin


def noise_for(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """One draw per image from its own CPU generator: the same noise on every device."""
    return torch.stack([torch.randn(shape, generator=gen) for gen in generators])


def encode(vae, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Each image's latents, sampled from the VAE's distribution with its own generator, scaled
    (diffusers' retrieve_latents, one image at a time)."""
    dtype, device = vae.dtype, vae.device
    latents = [vae.encode(pixels[k:k + 1].to(device, dtype)).latent_dist.sample(generators[k])
               for k in range(len(generators))]
    return vae.config.scaling_factor * torch.cat(latents).float()


def image_to_image(vae, pixels: torch.Tensor, generators: list[torch.Generator], scheduler,
                   steps: int, strength: float) -> Start:
    """The image's latents noised to where a run at `strength` begins."""
    begin = strength_begin(scheduler, steps, strength)
    image = pixels if pixels.shape[1] == 4 else encode(vae, pixels, generators)  # 4: latents
    noise = noise_for(generators, tuple(image.shape[1:])).to(image.device)
    at = scheduler.timesteps[begin:begin + 1].repeat(len(generators))
    return Start(scheduler.add_noise(image, noise, at), begin)


def inpainting(vae, pixels: torch.Tensor, masks: torch.Tensor, generators: list[torch.Generator],
               scheduler, steps: int, strength: float, unet_channels: int) -> Start:
    """Inpainting's start: `masks` (1 = draw again) at the pixels' size, binarized."""
    begin = strength_begin(scheduler, steps, strength)
    full = strength == 1.0  # as diffusers: from pure noise, the image only through the mask
    nine = unet_channels == 9
    image = encode(vae, pixels, generators) if not (nine and full) else None
    shape = (vae.config.latent_channels, *(side // upscaling(vae)
                                           for side in pixels.shape[-2:]))
    noise = noise_for(generators, shape).to(vae.device)
    if full:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image, noise,
                                      scheduler.timesteps[begin:begin + 1].repeat(len(noise)))
    mask = torch.nn.functional.interpolate(masks, size=shape[1:]).to(vae.device)
    masked_pixels = pixels * (masks < 0.5)
    if nine:
        masked = encode(vae, masked_pixels, generators)
        return Start(latents, begin, extra=torch.cat([mask, masked], dim=1))
    # diffusers encodes the masked image here even for an ordinary UNet, which never reads it:
    # its sample's draws are taken from each generator all the same, so that an ancestral
    # sampler's later draws are diffusers' own.
    for gen in generators:
        torch.randn((1, *shape), generator=gen, dtype=vae.dtype)
    return Start(latents, begin, blend=_blend(scheduler, image, noise, mask))


def _blend(scheduler, image: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> Blend:
    """After each step: the kept area back as the image noised to the next timestep."""

    def blend(state: StepState) -> torch.Tensor:
        rows = state.positions
        kept = image[rows]
        if state.step < state.total_steps:
            after = scheduler.timesteps[state.step]
            kept = scheduler.add_noise(kept, noise[rows], torch.tensor([after]))
        return (1 - mask[rows]) * kept + mask[rows] * state.latents

    return blend


def upscaling(decoder) -> int:
    """Image size over latent size for a VAE or tiny decoder: it doubles at every block but the
    first."""
    return 2 ** (len(decoder.config.block_out_channels) - 1)
