"""The OpenVINO peer: the baseline pipeline's own UNet, VAE decoder and text encoder converted to
OpenVINO (`openvino.convert_model`) and run by OpenVINO's CPU plugin, what FastSD CPU and
optimum-intel's OVStableDiffusionPipeline do underneath.

Why not optimum-intel itself: optimum-intel 2.2 pins transformers < 5.6 (sdaccel runs 5.24), and
with our versions held pip falls back to optimum-intel 1.15, which predates transformers 5.
OpenVINO's runtime has no such pins. Like optimum-intel's fastest mode (`reshape` + `compile`),
each model is compiled for the static shapes of the call (once per shape, on the first call),
with OpenVINO's own default precision unless `inference_precision` names one: bf16 on a CPU with
AMX or AVX512-BF16, f32 elsewhere. The scheduler, the noise and the guidance stay diffusers' own.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch


class _Converted:
    """One module converted once, compiled per input shape, called with torch tensors."""

    def __init__(self, module: torch.nn.Module, example: tuple[torch.Tensor, ...],
                 config: dict[str, str]) -> None:
        import openvino as ov

        self.core = ov.Core()
        self.config = config
        # Traced once at these shapes (then reshaped per call): the tracer's warnings about
        # shape-dependent branches are what static shapes mean, not news for the user.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            self.model = ov.convert_model(module, example_input=example)
        self._compiled: dict[tuple, Any] = {}

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        shapes = tuple(tuple(x.shape) for x in inputs)
        compiled = self._compiled.get(shapes)
        if compiled is None:
            model = self.model.clone()
            model.reshape({port.any_name: list(shape)
                           for port, shape in zip(model.inputs, shapes, strict=True)})
            compiled = self._compiled[shapes] = self.core.compile_model(model, "CPU", self.config)
        out = compiled([x.detach().cpu().numpy() for x in inputs])[0]
        return torch.from_numpy(out.copy())


def _type_name(element_type) -> str:
    """OpenVINO's element type as its short name ("f32", "bf16")."""
    return element_type.to_string() if hasattr(element_type, "to_string") else str(element_type)


class _UNetCall(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _DecoderCall(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


class _TextCall(torch.nn.Module):
    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


def apply_openvino(pipe, params: dict[str, Any]):
    """Convert the pipeline's UNet, VAE decoder and text encoder; route their calls through
    OpenVINO (the torch modules stay, for their configs and the FLOP count)."""
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if params["inference_precision"] != "default":
        config["INFERENCE_PRECISION_HINT"] = params["inference_precision"]
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    channels, size = unet.config.in_channels, unet.config.sample_size
    width = text_encoder.config.hidden_size
    length = pipe.tokenizer.model_max_length
    ov_unet = _Converted(_UNetCall(unet), (
        torch.randn(2, channels, size, size), torch.tensor(999),
        torch.randn(2, length, width)), config)
    ov_decoder = _Converted(_DecoderCall(vae), (
        torch.randn(1, vae.config.latent_channels, size, size),), config)
    ov_text = _Converted(_TextCall(text_encoder),
                         (torch.zeros(1, length, dtype=torch.long),), config)

    def unet_forward(sample, timestep, encoder_hidden_states, *args, return_dict=True, **kw):
        timestep = torch.as_tensor(timestep, dtype=torch.long).reshape(())
        return (ov_unet(sample.float(), timestep, encoder_hidden_states.float()),)

    def decode(latents, return_dict=True, generator=None):
        return (ov_decoder(latents.float()),)

    def text_forward(input_ids, attention_mask=None, output_hidden_states=None, **kw):
        if output_hidden_states:  # clip_skip: not converted (sdaccel never asks for it)
            raise NotImplementedError("the OpenVINO peer converts the last hidden state only")
        return (ov_text(input_ids.long()),)

    unet.forward = unet_forward
    vae.decode = decode
    text_encoder.forward = text_forward
    pipe._sdaccel_peer = (ov_unet, ov_decoder, ov_text)
    return None


def precision_label(params: dict[str, Any]) -> str:
    """The precision column of the peer's row, e.g. "f32 (OpenVINO default)"."""
    import openvino as ov

    if params["inference_precision"] != "default":
        return f"{params['inference_precision']} (OpenVINO)"
    default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    return f"{_type_name(default)} (OpenVINO default)"
