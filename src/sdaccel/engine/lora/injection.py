"""A LoRA file's PEFT layers, made by diffusers' own loading and taken out of the model again.

`load_lora_into_unet` / the steps of diffusers' text-encoder loading inject PEFT layers holding
the file into the model, exactly as a pipeline's `load_lora_weights` does (an SDXL pipeline's
for SDXL: its second text encoder takes the file's `text_encoder_2.` part the same way).
`attach` checks that the file is for the model's family and that every layer of the file found
its module, then takes the PEFT layers out again: the model's modules are the very objects they
were (a compiled UNet keeps its graph), and the layers are kept aside for LoraSwitcher to fuse
(their `get_delta_weight`) or to inject for good (unfused).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from sdaccel.engine.loading.checkpoint import first_line
from sdaccel.engine.lora.files import SGM_LAYERS_PER_BLOCK, LoraFile, check_fits
from sdaccel.errors import LoraError

ADAPTER = "sdaccel"  # the PEFT adapter name of a file's kept-aside layers


def inject(component: str, model: torch.nn.Module, lora: LoraFile, adapter: str) -> None:
    """PEFT layers holding `lora` in `model`: diffusers' load_lora_into_unet, and for a text
    encoder ("text_encoder", SDXL's "text_encoder_2") the steps of diffusers'
    load_lora_into_text_encoder with that component's prefix."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

    if component == "unet":
        # low_cpu_mem_usage: the layers take the file's tensors, never a random init first (the
        # default of diffusers' load_lora_weights)
        Loader.load_lora_into_unet(lora.state_dict, lora.network_alphas, unet=model,
                                   adapter_name=adapter, metadata=lora.metadata,
                                   low_cpu_mem_usage=True)
    else:
        _inject_text_encoder(model, lora, adapter, prefix=component)


def _inject_text_encoder(model: torch.nn.Module, lora: LoraFile, adapter: str,
                         prefix: str) -> None:
    """diffusers' `_load_lora_into_text_encoder`, step for step (its key conversions, rank
    per layer and LoraConfig), but injecting with PEFT directly rather than through
    transformers' `load_adapter` (diffusers' last step), so this module knows every layer it
    changes and keeps its exact original."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    state_dict = {k.removeprefix(f"{prefix}."): v for k, v in lora.state_dict.items()
                  if k.startswith(f"{prefix}.")}
    metadata = None if lora.metadata is None else {
        k.removeprefix(f"{prefix}."): v for k, v in lora.metadata.items()
        if k.startswith(f"{prefix}.")}
    state_dict = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict))
    if not hasattr(model, "text_model"):
        state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    rank = {}
    for name, _ in model.named_modules():
        if name.endswith((".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")):
            key = f"{name}.lora_B.weight"
            if key in state_dict:
                rank[key] = state_dict[key].shape[1]
    alphas = None
    if lora.network_alphas is not None:
        alphas = {k.removeprefix(f"{prefix}."): v for k, v in lora.network_alphas.items()
                  if k.split(".")[0] == prefix}
    config = _create_lora_config(state_dict, alphas, metadata, rank, is_unet=False)
    inject_adapter_in_model(config, model, adapter_name=adapter, low_cpu_mem_usage=True)
    set_peft_model_state_dict(model, state_dict, adapter_name=adapter, low_cpu_mem_usage=True)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """diffusers logs a failed injection as an error and PEFT warns about keys; sdaccel says what
    is wrong in its own one line (the LoraError) instead."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.CRITICAL + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def peft_layers(model: torch.nn.Module) -> dict[str, Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: module for name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer)}


class Untouched:
    """What PEFT changes on a model besides its modules, put back as it was: requires_grad of
    every parameter (PEFT freezes all but its own) and the adapter bookkeeping attributes."""

    ATTRIBUTES = ("peft_config", "_hf_peft_config_loaded")

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.grads = {name: p.requires_grad for name, p in model.named_parameters()}
        self.attributes = {a: model.__dict__[a] for a in self.ATTRIBUTES if a in model.__dict__}

    def restore(self) -> None:
        for name, p in self.model.named_parameters():
            if name in self.grads:
                p.requires_grad_(self.grads[name])
        for attribute in self.ATTRIBUTES:
            if attribute in self.attributes:
                self.model.__dict__[attribute] = self.attributes[attribute]
            else:
                self.model.__dict__.pop(attribute, None)


def take_out(model: torch.nn.Module) -> dict[str, Any]:
    """Every PEFT layer out of `model`, its original module back in its place; returns them."""
    layers = peft_layers(model)
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    return layers


def _strip_text_model(name: str, model: torch.nn.Module) -> str:
    # transformers 5's CLIPTextModel has no `text_model.` level; diffusers drops it as well
    return name.removeprefix("text_model.") if not hasattr(model, "text_model") else name


def attach(lora: LoraFile, models: dict[str, torch.nn.Module],
            model_name: str) -> dict[str, dict[str, Any]]:
    """Inject `lora` into each model through diffusers, check that every layer of the file
    found its module, take the PEFT layers out again; returns them, component -> module name
    -> PEFT layer holding the adapter ADAPTER (its factors in fp32)."""
    _check_family(lora, models, model_name)
    attached: dict[str, dict[str, Any]] = {}
    for component, wanted in lora.modules.items():
        model = models[component]
        untouched = Untouched(model)
        try:
            with quiet_libraries():
                inject(component, model, lora, ADAPTER)
        except Exception as exc:
            raise LoraError(_misfit(lora, component, model_name, exc, models)) from None
        finally:
            layers = take_out(model)
            untouched.restore()
        names = {_strip_text_model(n, model) for n in wanted}
        missing = sorted(names - set(layers))
        if missing:
            raise LoraError(
                f"LoRA file {str(lora.path)!r} does not fit model {model_name}: {len(missing)} "
                f"of its {len(names)} {component} layers have no such module in the model "
                f"(e.g. {missing[0]!r}); made for another architecture "
                f"({_others(models)})?")
        for layer in layers.values():
            if getattr(layer, "lora_bias", {}).get(ADAPTER) or \
                    getattr(layer, "use_dora", {}).get(ADAPTER):
                raise LoraError(f"LoRA file {str(lora.path)!r}: LoRA with bias or DoRA "
                                "layers is not supported")
            layer.lora_A[ADAPTER].float()
            layer.lora_B[ADAPTER].float()
        attached[component] = layers
    return attached


def _check_family(lora: LoraFile, models: dict[str, torch.nn.Module], model_name: str) -> None:
    """The file is for this model's family (SDXL: a second text encoder), its UNet reads text
    features as wide as the model's, and a model has every component it changes."""
    unet = models.get("unet")
    config = getattr(unet, "config", None)
    width = getattr(config, "cross_attention_dim", None)
    check_fits(lora, "text_encoder_2" in models, model_name,
               width if isinstance(width, int) else None)
    for component in lora.modules:
        if component not in models:
            raise LoraError(f"LoRA file {str(lora.path)!r} has weights for {component}, which "
                            f"model {model_name} does not have")
    blocks = getattr(config, "layers_per_block", SGM_LAYERS_PER_BLOCK)
    if lora.sgm_blocks and blocks != SGM_LAYERS_PER_BLOCK:
        raise LoraError(f"LoRA file {str(lora.path)!r} numbers UNet blocks as kohya does for "
                        f"SDXL ({SGM_LAYERS_PER_BLOCK} layers per block); the UNet of model "
                        f"{model_name} has {blocks}")


def _others(models: dict[str, torch.nn.Module]) -> str:
    return "SD 1.x, SD 2.x" if "text_encoder_2" in models else "SD 2.x, SDXL"


def _misfit(lora: LoraFile, component: str, model_name: str, exc: Exception,
            models: dict[str, torch.nn.Module]) -> str:
    text = str(exc)
    found = re.search(r"size mismatch for (\S+?)\.lora_\w+?\.[^:]*: copying a param with shape "
                      r"torch\.Size\((\[.*?\])\).*?current model is torch\.Size\((\[.*?\])\)", text)
    if found or "size mismatch" in text:
        detail = (f"{component} layer {found[1]}: the file's LoRA weight is {found[2]}, the "
                  f"model's {found[3]}" if found else first_line(exc))
        return (f"LoRA file {str(lora.path)!r} does not fit model {model_name} ({detail}); "
                f"made for another architecture ({_others(models)})?")
    return (f"LoRA file {str(lora.path)!r} cannot be applied to the {component} of model "
            f"{model_name}: {first_line(exc)}")
