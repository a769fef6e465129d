"""Textual inversion on the bundled model: one new token's vector learnt from images alone.

The images are the data set's scenes of one colour (say red), their captions with that colour
word replaced by the new token ("a <x> star on a white background"). Everything of the model
stays frozen; only the token's row of the text encoder's embedding table is trained, on the
UNet's noise-prediction loss, starting from the mean of the palette's colour words (no colour
in particular). The result is saved as AUTOMATIC1111 and diffusers files, which
`--embedding` loads:

    python -m sdaccel.training.train_embedding --out runs/ti --colour red --steps 150

writes runs/ti/learned_embeds.safetensors ({"<x>": (1, 128)}) and runs/ti/learned.pt (A1111's
layout, token "learned" after its file).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdaccel.shapes import dataset


def training_set(colour: str, token: str, n: int) -> tuple[list[np.ndarray], list[str]]:
    """`n` training images whose shapes are `colour`, captions naming it by `token`."""
    images, captions = [], []
    index = 0
    while len(images) < n:
        image, text, scene = dataset.example(index)
        index += 1
        if scene.colour == colour:  # the shape's colour is the first colour word
            images.append(np.asarray(image))
            captions.append(text.replace(colour, token, 1))
    return images, captions


def train_embedding(colour: str = "red", token: str = "<x>", steps: int = 150, batch: int = 16,
                    lr: float = 1e-2, n: int = 96, seed: int = 0,
                    model: str = "bundled:shapes") -> torch.Tensor:
    """The learnt vector of `token`, (1, hidden size)."""
    from diffusers import DDPMScheduler

    from sdaccel.engine.loading.models import load_components

    parts = load_components(model)
    tokenizer, text_encoder, unet, vae = (parts.tokenizer, parts.text_encoder, parts.unet,
                                          parts.vae)
    for module in (text_encoder, unet, vae):
        module.requires_grad_(False).eval()
    images, captions = training_set(colour, token, n)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    means, stds = posterior.mean, posterior.std

    tokenizer.add_tokens(token)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    row = tokenizer.convert_tokens_to_ids(token)
    table = text_encoder.get_input_embeddings().weight
    colour_rows = tokenizer.convert_tokens_to_ids([f"{c}</w>" for c in dataset.COLOURS])
    with torch.no_grad():
        table[row] = table[colour_rows].mean(0)
    table.requires_grad_(True)
    only_row = torch.zeros(table.shape[0], 1)
    only_row[row] = 1.0

    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    noise_schedule = DDPMScheduler.from_config(parts.scheduler_config)
    optimizer = torch.optim.Adam([table], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(0, len(captions), (batch,), generator=gen)
        latents = (means[pick] + stds[pick] * torch.randn(means[pick].shape, generator=gen))
        latents = latents * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch,), generator=gen)
        states = text_encoder(ids[pick])[0]
        predicted = unet(noise_schedule.add_noise(latents, noise, t), t, states).sample
        loss = F.mse_loss(predicted, noise)
        optimizer.zero_grad()
        loss.backward()
        table.grad *= only_row  # the new token's row alone learns
        optimizer.step()
    return table[row].detach().clone()[None]


def save(vector: torch.Tensor, token: str, out: Path, name: str = "learned"
         ) -> tuple[Path, Path]:
    """diffusers' learned_embeds.safetensors ({token: vectors}) and A1111's `name`.pt, whose
    token is its file's stem, `name`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    diffusers_file = out / "learned_embeds.safetensors"
    save_file({token: vector.contiguous()}, str(diffusers_file))
    a1111_file = out / f"{name}.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vector}, "name": name,
                "step": 0, "sd_checkpoint": None, "sd_checkpoint_name": None}, a1111_file)
    return diffusers_file, a1111_file


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--colour", default="red", choices=dataset.COLOURS)
    parser.add_argument("--token", default="<x>", help="the diffusers file's token")
    parser.add_argument("--name", default="learned", help="the A1111 file's name and token")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    vector = train_embedding(args.colour, args.token, args.steps, seed=args.seed)
    for path in save(vector, args.token, args.out, args.name):
        print(path)


if __name__ == "__main__":
    main()
