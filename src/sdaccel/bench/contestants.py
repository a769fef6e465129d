"""The rows' runners, loaded once and called many times: our Engine for a configuration, a plain
diffusers pipeline for a baseline (StableDiffusionPipeline, or StableDiffusionXLPipeline for an
SDXL model), the same pipeline patched by a peer package.

A Contestant only knows how to make one call and what it has measured so far; the order of calls,
the clock and the statistics live in `runner.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdaccel.bench.configs import BenchConfig, call_plan, device_of, plan_steps
from sdaccel.bench.fidelity import pipeline_recipe, recipe
from sdaccel.bench.peers import PeerSpec, apply_peer, peer_failure
from sdaccel.seeds import image_seeds
from sdaccel.settings import Settings

# One call: (PIL images, step timestamps, per-image cost or None where the runner cannot say).
CallResult = tuple[list, list[float], list[float] | None]


@dataclass
class Contestant:
    label: str
    kind: str  # "baseline" | "config" | "peer" | "equal-cost"
    baseline: str  # label of the row it is compared with (its own for a main baseline)
    settings: Settings
    device: str
    steps: int
    batch: int
    nfe: float  # per image, as planned; engine rows replace it by the measured mean
    precision: str
    compile: str
    call: Callable[[str, int], CallResult]
    plan: list[tuple[str, int]] = field(default_factory=list)  # (prompt, seed) of call i
    # The settings that choose its image (fidelity.recipe): rows whose recipes differ are
    # meant to make different pictures.
    recipe: dict[str, Any] = field(default_factory=dict)
    unet: Any = None  # the module whose FLOPs make a pipeline row's cost
    modules: list = field(default_factory=list)  # its models (UNet, VAE, text encoder)
    passes: str = ""
    cache_entries: int = 0
    notes: list[str] = field(default_factory=list)  # the bench's remarks on the row
    warnings: list[str] = field(default_factory=list)  # its engine's Warning events, each once
    cost_source: str = ""
    equal_cost_of: str | None = None
    peer: PeerSpec | None = None
    # What the runner measured.
    load_seconds: float = 0.0
    load_bytes: int = 0
    memory_kind: str = ""
    working_bytes: int = 0  # largest rise above resident memory during one of its calls
    first_call_seconds: float | None = None
    warmup_costs: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # one per timed round, whole call
    rates: list[float] = field(default_factory=list)
    images: list = field(default_factory=list)  # timed calls only, in call order
    costs: list[float] = field(default_factory=list)  # per timed image
    nfes: list[float] = field(default_factory=list)  # per timed image (engine rows)
    unet_flops: int | None = None  # one call's, measured (pipeline rows with peers beside)
    flops_cost: float | None = None


def _step_clock(device: str) -> tuple[list[float], Callable[[], None]]:
    from sdaccel.gpu_stats import synchronize

    marks: list[float] = []

    def mark() -> None:
        synchronize(device)
        marks.append(time.perf_counter())

    return marks, mark


def weight_bytes(modules) -> int:
    """Bytes of the parameters and buffers of `modules`, each storage counted once."""
    seen, total = set(), 0
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def load_engine(config: BenchConfig, prompts, calls: int) -> Contestant:
    """Our Engine for one configuration (kind "config"; the runner relabels equal-cost rows)."""
    from sdaccel.bench.configs import compile_label, precision_label
    from sdaccel.events import StepDone, Warning
    from sdaccel.runs import start_engine

    settings = config.settings
    device = device_of(settings)
    marks, mark = _step_clock(device)
    warnings: list[str] = []

    def on_event(event) -> None:
        if isinstance(event, StepDone):
            mark()
        elif isinstance(event, Warning) and event.message not in warnings:
            warnings.append(event.message)

    engine, cache_entries = start_engine(settings, on_event)
    engine.check_prompts(dict.fromkeys(prompts))  # one warning for all of them
    contestant: Contestant

    def call(prompt: str, seed: int) -> CallResult:
        marks.clear()
        results = engine.generate([prompt], seed=seed)
        contestant.nfes.extend(float(r.nfe) for r in results)
        costs = [getattr(r, "cost", None) for r in results]
        return ([r.image for r in results], list(marks),
                None if any(c is None for c in costs) else [float(c) for c in costs])

    guided = settings.generation.guidance_scale > 1.0
    contestant = Contestant(
        label=config.label, kind="config", baseline="", settings=settings, device=device,
        steps=plan_steps(settings), batch=settings.generation.num_images_per_prompt,
        nfe=float(plan_steps(settings) * (2 if guided else 1)),
        precision=precision_label(engine.settings),  # "auto" as the engine chose it
        compile=compile_label(settings), call=call,
        plan=call_plan(settings, prompts, calls), recipe=recipe(settings, plan_steps(settings)),
        passes=", ".join(getattr(engine, "passes", [])),
        cache_entries=len(cache_entries), warnings=warnings,
        cost_source="engine",
        modules=[m for m in (getattr(engine, name, None) for name in
                             ("unet", "vae", "text_encoder", "text_encoder_2"))
                 if m is not None],
    )
    return contestant


def load_pipeline(settings: Settings, dtype: str, prompts, calls: int,
                  peer: PeerSpec | None = None) -> Contestant:
    """A plain diffusers pipeline (StableDiffusionPipeline; StableDiffusionXLPipeline without
    the watermarker for an SDXL model) on its own copy of the model, read in `dtype` as
    `from_pretrained(torch_dtype=...)` reads it (random weights: drawn in fp32, then cast),
    with the configuration's scheduler class, its LoRAs (diffusers' own loading, fused) and its
    tiny decoder in place of the VAE (as `pipe.vae = AutoencoderTiny...` does); patched by
    `peer` when given. It is given each prompt as the configuration's engine reads it
    (`_text_inputs`)."""
    import torch

    from sdaccel.engine.loading.precision import DTYPES, resolve_device

    device = resolve_device(settings.device)
    pipe, sdxl = _pipeline(settings, DTYPES[dtype], device)
    pipe.set_progress_bar_config(disable=True)
    _fuse_loras(pipe, settings)
    prepare = apply_peer(peer, pipe) if peer is not None else None
    text_inputs, reading_note = _text_inputs(pipe, settings, prompts, DTYPES[dtype], sdxl)
    g = settings.generation
    batch = g.num_images_per_prompt
    steps = plan_steps(settings)
    # the engine's eta (TCD's 0.3 by default); the pipeline passes it only to a step taking one
    eta = settings.sampler.eta_in_force or 0.0
    marks, mark = _step_clock(str(device))

    def on_step_end(_pipe, _index, _t, kwargs):
        mark()
        return kwargs

    def call(prompt: str, seed: int) -> CallResult:
        marks.clear()
        if prepare is not None:
            prepare(seed)
        generators = [torch.Generator("cpu").manual_seed(k) for k in image_seeds(seed, batch)]
        try:
            text = text_inputs(prompt)
            out = pipe(text.pop("prompt", None), **text, num_inference_steps=steps,
                       guidance_scale=g.guidance_scale, height=g.height, width=g.width,
                       num_images_per_prompt=batch, generator=generators, eta=eta,
                       callback_on_step_end=on_step_end)
        except Exception as exc:
            if peer is None:
                raise
            raise peer_failure(peer, exc) from exc
        return list(out.images), list(marks), None

    return Contestant(
        label="", kind="peer" if peer else "baseline", baseline="", settings=settings,
        device=str(device), steps=steps, batch=batch,
        nfe=float(steps * (2 if g.guidance_scale > 1.0 else 1)),
        precision=(peer.peer.precision(peer.params) if peer and peer.peer.precision
                   else f"{dtype} (all)"), compile="eager", call=call,
        plan=call_plan(settings, prompts, calls), recipe=pipeline_recipe(settings, steps),
        unet=pipe.unet,
        modules=[pipe.unet, pipe.vae, pipe.text_encoder, *([pipe.text_encoder_2] if sdxl else [])],
        passes=peer.describe() if peer else "", cost_source=(
            "flops" if peer and not peer.peer.same_work else "steps"),
        peer=peer, notes=[reading_note] if reading_note else [],
    )


def _pipeline(settings: Settings, dtype, device) -> tuple[Any, bool]:
    """The configuration's model as a plain diffusers pipeline, in `dtype` on `device`, and
    whether it is SDXL (the engine's components: both text encoders and tokenizers, and the
    model's own rule for an empty negative prompt)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from sdaccel.engine.loading.models import load_components
    from sdaccel.engine.sampling.samplers import build_scheduler

    parts = load_components(settings.model_id, device=str(device), dtypes=dict.fromkeys(
        ("unet", "vae", "text_encoder", "text_encoder_2"), dtype))
    common = {"vae": _tiny_decoder(settings) or parts.vae, "text_encoder": parts.text_encoder,
              "tokenizer": parts.tokenizer, "unet": parts.unet,
              "scheduler": build_scheduler(settings.sampler.name, parts.scheduler_config,
                                           settings.sampler.schedule)}
    if parts.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            **common, text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2,
            force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt,
            add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return pipe.to(device=device, dtype=dtype), parts.is_sdxl


def _text_inputs(pipe, settings: Settings, prompts, dtype, sdxl: bool = False) -> tuple[
        Callable[[str], dict[str, Any]], str]:
    """How the pipeline gets each prompt, so that it is conditioned as the configurations it is
    compared with: as text where diffusers reads it as their engine does (a prompt within the
    text encoder's window, without AUTOMATIC1111 syntax: the same embeddings), else as the
    engine's embeddings of it (chained chunks, weights), made per call from the pipeline's own
    text encoder, since diffusers would cut it at the window or read the syntax as words. Also
    the note naming those prompts ("" when there are none). SDXL: both encoders' embeddings
    and the second's pooled output, the negative ones too, made as the engine makes them; as
    text, an empty negative prompt is None, which the pipeline turns into zeros where the model
    says so (force_zeros_for_empty_prompt), as the engine does with ""."""
    from sdaccel.engine.text.prompts import DualPromptEncoder, PromptEncoder

    weighting = settings.prompt.weighting
    if sdxl:
        readers = [PromptEncoder(tokenizer, encoder, pipe.device, dtype, weighting=weighting,
                                 hidden_layer=-2)
                   for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder),
                                              (pipe.tokenizer_2, pipe.text_encoder_2))]
        encoder = DualPromptEncoder(*readers, pipe.config.force_zeros_for_empty_prompt)
    else:
        readers = [PromptEncoder(pipe.tokenizer, pipe.text_encoder, pipe.device, dtype,
                                 weighting=weighting)]
        encoder = readers[0]
    differing = [p for p in dict.fromkeys(prompts)
                 if not all(_read_alike(reader, p) for reader in readers)]
    guided = settings.generation.guidance_scale > 1.0

    def inputs(prompt: str) -> dict[str, Any]:
        if prompt not in differing:
            return {"prompt": prompt, "negative_prompt": None if sdxl else ""}
        embeddings, pooled = encoder.encode_pooled([prompt], "" if guided else None)
        given = {"prompt_embeds": embeddings[-1:]}
        if sdxl:
            given["pooled_prompt_embeds"] = pooled[-1:]
        if guided:  # [negative; prompt]
            given["negative_prompt_embeds"] = embeddings[:1]
            if sdxl:
                given["negative_pooled_prompt_embeds"] = pooled[:1]
        return given

    note = "" if not differing else (
        f"{len(differing)} of {len(dict.fromkeys(prompts))} prompt(s) exceed the text encoder's "
        f"{readers[0].window}-token window or hold AUTOMATIC1111 syntax: diffusers gets sdaccel's "
        "embeddings of them (chained chunks, weights: prompt.weighting), as the rows compared "
        "with it read them, where alone it cuts them or reads the syntax as words")
    return inputs, note


def _read_alike(encoder, prompt: str) -> bool:
    """Whether diffusers' own reading of `prompt` (the text as is, cut at the window) is the
    engine's: always without weighting, else when it is one chunk of unweighted tokens that
    are diffusers' tokens."""
    if not encoder.weighting:
        return True
    chunks = encoder.chunks(prompt)
    ids = encoder.tokenizer(prompt, padding="max_length", max_length=encoder.window,
                            truncation=True).input_ids
    return len(chunks) == 1 and not chunks[0].weighted and chunks[0].ids == ids


def _tiny_decoder(settings: Settings):
    """The configuration's tiny decoder (an AutoencoderTiny, fp32 on the CPU; the pipeline casts
    and moves it), or None for the model's own VAE."""
    if not settings.tiny_decoder:
        return None
    from sdaccel.engine.loading.decoders import read_tiny_decoder

    return read_tiny_decoder(settings.tiny_decoder).model


def _fuse_loras(pipe, settings: Settings) -> None:
    """The configuration's LoRAs as a diffusers user applies them: `load_lora_weights` (which
    converts kohya/A1111 keys), `set_adapters` with their weights, then `fuse_lora` into the
    weights and the PEFT layers unloaded, so no step pays for them (the engine fuses too)."""
    if not settings.loras:
        return
    from sdaccel.engine.loading.checkpoint import first_line
    from sdaccel.errors import LoraError

    names = [f"lora{k}" for k in range(len(settings.loras))]
    for name, entry in zip(names, settings.loras, strict=True):
        try:
            pipe.load_lora_weights(str(entry.path), adapter_name=name)
        except Exception as exc:  # diffusers' errors vary by format: one line naming the file
            raise LoraError(f"LoRA {str(entry.path)!r}: diffusers' load_lora_weights fails for "
                            f"the baseline: {type(exc).__name__}: {first_line(exc)}") from None
    pipe.set_adapters(names, [entry.weight for entry in settings.loras])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
