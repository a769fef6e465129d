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

from sdaccel.engine.sampling.cost import added_kwargs, added_shapes


class OpenVinoModel:
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

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The output, or a tuple of them for a module with several."""
        shapes = tuple(tuple(x.shape) for x in inputs)
        compiled = self._compiled.get(shapes)
        if compiled is None:
            model = self.model.clone()
            model.reshape({port.any_name: list(shape)
                           for port, shape in zip(model.inputs, shapes, strict=True)})
            compiled = self._compiled[shapes] = self.core.compile_model(model, "CPU", self.config)
        results = compiled([x.detach().cpu().numpy() for x in inputs])
        outputs = tuple(torch.from_numpy(results[port].copy()) for port in compiled.outputs)
        return outputs[0] if len(outputs) == 1 else outputs


def _type_name(element_type) -> str:
    """OpenVINO's element type as its short name ("f32", "bf16")."""
    return element_type.to_string() if hasattr(element_type, "to_string") else str(element_type)


class _Forward(torch.nn.Module):
    """`call(module, *inputs)` as a forward: the part of `module` that is converted (the module
    is registered, so its weights are the converted model's weights, not traced constants)."""

    def __init__(self, module: torch.nn.Module, call) -> None:
        super().__init__()
        self.module = module
        self._call = call

    def forward(self, *inputs):
        return self._call(self.module, *inputs)


def openvino_config(inference_precision: str) -> dict[str, str]:
    """The CPU plugin's settings: latency (one stream, all cores), and the precision unless
    "default" (OpenVINO's own choice)."""
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if inference_precision != "default":
        config["INFERENCE_PRECISION_HINT"] = inference_precision
    return config


def unet_inputs(unet: torch.nn.Module, batch: int, size: int, context: tuple[int, int],
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """Random inputs of one UNet call, in `convert_unet`'s order: sample (latents `size` wide),
    timestep, text embeddings of `context` = (tokens, width), and for SDXL the pooled text and
    the six size numbers."""
    inputs = [torch.randn(batch, unet.config.in_channels, size, size, generator=generator),
              torch.tensor(999), torch.randn(batch, *context, generator=generator)]
    if added_shapes(unet):
        (_, pooled), _ = added_shapes(unet)
        pixels = float(size * 8)
        inputs += [torch.randn(batch, pooled, generator=generator),
                   torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]]).repeat(batch, 1)]
    return tuple(inputs)


def _unet_call(unet, sample, timestep, context, *added):
    return unet(sample, timestep, context, return_dict=False, **added_kwargs(added))[0]


def convert_unet(unet: torch.nn.Module, context: tuple[int, int],
                 config: dict[str, str], size: int | None = None) -> OpenVinoModel:
    """The UNet as OpenVINO runs it: `unet_inputs` (traced at `size` latents, by default the
    model's own sample size) -> noise prediction."""
    example = unet_inputs(unet, 2, size or unet.config.sample_size, context)
    return OpenVinoModel(_Forward(unet, _unet_call), example, config)


class _SdxlEncoded(tuple):
    """(first output, penultimate hidden states): all StableDiffusionXLPipeline reads of a text
    encoder's output, as `output[0]` (the pooled projection of the second encoder) and
    `output.hidden_states[-2]`."""

    @property
    def hidden_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self[1], self[0]  # only [-2] is read


def apply_openvino(pipe, params: dict[str, Any]):
    """Convert the pipeline's UNet, VAE decoder and text encoder(s); route their calls through
    OpenVINO (the torch modules stay, for their configs and the FLOP count). SDXL: both text
    encoders, each giving its first output and its penultimate hidden states."""
    config = openvino_config(params["inference_precision"])
    vae, unet = pipe.vae, pipe.unet
    length, size = pipe.tokenizer.model_max_length, unet.config.sample_size
    ov_unet = convert_unet(unet, (length, unet.config.cross_attention_dim), config)
    ov_decoder = OpenVinoModel(
        _Forward(vae, lambda v, latents: v.decode(latents, return_dict=False)[0]),
        (torch.randn(1, vae.config.latent_channels, size, size),), config)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    for encoder in (pipe.text_encoder, pipe.text_encoder_2) if sdxl else (pipe.text_encoder,):
        encoder.forward = _openvino_text_forward(encoder, length, config, sdxl)

    def unet_forward(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None,
                     return_dict=True, **kw):
        timestep = torch.as_tensor(timestep, dtype=torch.long).reshape(())
        added = [added_cond_kwargs[k].float() for k in ("text_embeds", "time_ids")
                 ] if added_cond_kwargs else []
        return (ov_unet(sample.float(), timestep, encoder_hidden_states.float(), *added),)

    def decode(latents, return_dict=True, generator=None):
        return (ov_decoder(latents.float()),)

    unet.forward = unet_forward
    vae.decode = decode
    return None


def _openvino_text_forward(encoder, length: int, config: dict[str, str], sdxl: bool):
    """The encoder's forward through OpenVINO: SD 1.x reads the last hidden state, SDXL the
    first output and the penultimate hidden states (`_SdxlEncoded`)."""
    if sdxl:
        def both(te, ids):
            out = te(ids, output_hidden_states=True, return_dict=False)
            return out[0], out[-1][-2]
        converted = OpenVinoModel(_Forward(encoder, both),
                                  (torch.zeros(1, length, dtype=torch.long),), config)
        return lambda input_ids, *args, **kw: _SdxlEncoded(converted(input_ids.long()))

    converted = OpenVinoModel(_Forward(encoder, lambda te, ids: te(ids, return_dict=False)[0]),
                              (torch.zeros(1, length, dtype=torch.long),), config)

    def text_forward(input_ids, attention_mask=None, output_hidden_states=None, **kw):
        if output_hidden_states:  # clip_skip: not converted (sdaccel never asks for it)
            raise NotImplementedError("the OpenVINO peer converts the last hidden state only")
        return (converted(input_ids.long()),)

    return text_forward


def precision_label(params: dict[str, Any]) -> str:
    """The precision column of the peer's row, e.g. "f32 (OpenVINO default)"."""
    import openvino as ov

    if params["inference_precision"] != "default":
        return f"{params['inference_precision']} (OpenVINO)"
    default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    return f"{_type_name(default)} (OpenVINO default)"
