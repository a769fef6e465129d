"""Engine: built once from Settings, then generate(prompts) -> ImageResults, as often as needed."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from sdaccel.engine.loading.decoders import TinyDecoder, read_tiny_decoder
from sdaccel.engine.loading.models import Components, load_components
from sdaccel.engine.loading.precision import (
    DTYPES,
    cast,
    choose_precisions,
    device_for,
    load_dtypes,
)
from sdaccel.engine.lora import LoraSwitcher, prompt_tags, read_loras
from sdaccel.engine.sampling.cost import UNetCost
from sdaccel.engine.sampling.feature_cache import LayeredUNet
from sdaccel.engine.sampling.guider import FeatureCache, Guider, UNetWrapper
from sdaccel.engine.sampling.loop import SampleOutput, StepCallback, StepState, sample
from sdaccel.engine.sampling.policies import policy_for
from sdaccel.engine.sampling.policy import StepPolicy
from sdaccel.engine.sampling.samplers import build_scheduler
from sdaccel.engine.sampling.track import Track
from sdaccel.engine.speed.compile import EagerFallback, compile_callable
from sdaccel.engine.speed.optimize import apply_passes, with_attention
from sdaccel.engine.starts import image_to_image, inpainting, noise_for, upscaling
from sdaccel.engine.text.embeddings import add_embeddings, expansions, read_embeddings
from sdaccel.engine.text.prompts import DualPromptEncoder, PromptEncoder, plain_text
from sdaccel.engine.text.vocabulary import unknown_words
from sdaccel.errors import ConfigError, ModelNotFoundError
from sdaccel.events import (
    BatchDone,
    BatchStarted,
    EventHandler,
    PlanDecided,
    StepDone,
    Warning,
    ignore,
)
from sdaccel.seeds import image_seeds
from sdaccel.settings import (
    GenerationSettings,
    HiresSettings,
    LoraEntry,
    SamplerSettings,
    Settings,
    adaptive_problem,
    sampler_problem,
)
from sdaccel.start import ImageStart


@dataclass
class ImageResult:
    prompt: str
    negative_prompt: str
    seed: int  # this image's own seed: generating it alone with this seed gives it again
    steps: int  # solver steps this image took (its own total under adaptive steps)
    # UNet evaluations spent on it: one a step (Heun: 2 a step but the first, 2n - 1), twice
    # that with guidance (cond + uncond)
    nfe: int
    cost: float  # UNet work in full-UNet equivalents: one full call of this image = 1 (both
    # halves when guided, its one row when not)
    decisions: str  # what ran at each step, one letter a step (F full, C cached, f/c cond only,
    # - skipped; see engine/sampling/stepwise.py)
    image: object  # PIL.Image.Image
    latents: torch.Tensor  # final latents (before VAE decode), fp32, on the CPU
    seconds: float  # wall time of its batch divided by the batch size
    # The size, guidance, batch and strength it was asked for (with the hires fix: the first
    # pass's size; the image is `hires.scale` times larger)
    generation: GenerationSettings
    plan: PlanDecided | None = None  # the adaptive decision, when adaptive steps are on
    # The LoRAs in force: settings entries (path, weight, sha256) with A1111's name and hash.
    loras: tuple[dict, ...] = ()
    # The textual-inversion embeddings in force: settings entries with path, token and sha256.
    embeddings: tuple[dict[str, str], ...] = ()
    # The tiny decoder that decoded it (path, name, sha256; loading/decoders.py); None: the VAE.
    decoder: dict[str, str] | None = None
    strength: float | None = None  # drawn from an init image at this strength; None: from noise
    mask_blur: int | None = None  # inpainted: the mask's blur radius; None: no mask
    hires: HiresSettings | None = None  # the hires fix's second pass, when one ran


@dataclass(frozen=True)
class Conditioning:
    """A batch's text conditioning: embeddings rows ([uncond; cond] when guided, repeated per
    image) and, for SDXL, the second encoder's pooled rows in the same order."""

    embeddings: torch.Tensor
    pooled: torch.Tensor | None = None

    def added(self, g: GenerationSettings) -> dict[str, torch.Tensor] | None:
        """SDXL's added conditioning for a batch of g's size: the pooled text and the size
        conditioning (original size, crop top-left (0, 0), target size; as the pipeline's
        defaults), one row per embeddings row."""
        if self.pooled is None:
            return None
        sizes = torch.tensor([[g.height, g.width, 0, 0, g.height, g.width]],
                             dtype=self.pooled.dtype, device=self.pooled.device)
        return {"text_embeds": self.pooled, "time_ids": sizes.repeat(len(self.pooled), 1)}


def _nfe(decisions: str, halves: int) -> int:
    """UNet evaluations (of one image's row, full or shallow) its decisions spent."""
    return sum(halves if d in "FC" else 1 if d in "fc" else 0 for d in decisions)


class Engine:
    """Holds the loaded, cast and (optionally) compiled model for one Settings."""

    def __init__(self, settings: Settings, on_event: EventHandler = ignore, *,
                 unet_wrappers: Sequence[UNetWrapper] = (),
                 policy: StepPolicy | None = None) -> None:
        """`unet_wrappers`: each takes the UNet call (guider.UNetInput -> noise) and returns the
        call to use instead, innermost first: to watch, time or change every model evaluation.
        `policy`: the step policy (sampling/policy.py) to use instead of the one the settings
        choose by name (`adaptive.mode`)."""
        self.on_event = on_event
        self.unet_wrappers = tuple(unet_wrappers)
        self.device = device_for(settings)
        # "auto" precisions become what this device runs natively (inspect-config shows why).
        self.precisions = choose_precisions(settings, self.device)
        self.settings = settings.model_copy(
            update={key: choice.precision for key, choice in self.precisions.items()})
        for key, choice in self.precisions.items():
            if choice.slow:
                on_event(Warning(f"{key}: {choice.precision} {choice.reason}"))
        # A bad LoRA file, or one for another model family, fails before loading
        lora_files = read_loras(settings.loras, settings.model_id)
        self.policy = policy_for(settings.adaptive) if policy is None else policy
        embedding_files = read_embeddings(settings.embeddings)  # a bad file fails before loading
        self.tiny: TinyDecoder | None = (read_tiny_decoder(settings.tiny_decoder)
                                         if settings.tiny_decoder else None)  # so does this one
        self.components = load_components(settings.model_id, device=str(self.device),
                                          dtypes=load_dtypes(self.settings))
        self.embeddings = add_embeddings(embedding_files, self.components.text_encoders,
                                         settings.model_id)
        self._warned: set[str] = set()  # unknown prompt words already reported
        self._told_vocabulary = False
        self._prepare(self.components)
        self.lora.add_files(lora_files)
        self.lora.apply(settings.loras)  # fused before the first (compiling) UNet call

    # ------------------------------------------------------------------ set-up

    def _prepare(self, parts: Components) -> None:
        self._upcast_sdxl_vae(parts)
        s = self.settings
        self.unet = cast(parts.unet, s.unet_dtype, self.device).eval()
        self.vae = cast(parts.vae, s.vae_dtype, self.device).eval()
        # What decodes: the tiny decoder when the settings name one, else the model's VAE.
        self.decoder = self._cast_tiny_decoder() if self.tiny else self.vae
        self.text_encoder = cast(parts.text_encoder, s.text_encoder_dtype, self.device).eval()
        self.text_encoder_2 = None if parts.text_encoder_2 is None else cast(  # SDXL's second
            parts.text_encoder_2, s.text_encoder_dtype, self.device).eval()
        self.tokenizer = parts.tokenizer
        self.prompts = self._prompt_encoder(parts)
        self.unet_dtype = DTYPES[s.unet_dtype]
        self.vae_dtype = DTYPES[s.vae_dtype]
        # As diffusers' pipeline: the latent grid is the image over the decoder's upscaling.
        self.vae_scale_factor = upscaling(self.decoder)
        self._image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._mask_processor = VaeImageProcessor(  # as diffusers' inpainting pipeline's
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True,
            do_convert_grayscale=True)
        self.check_size(s.generation.height, s.generation.width)
        # PyTorch SDPA attention, then the speed passes the settings switch on.
        self.passes = apply_passes(self.unet, self.decoder, s, self.device, self.on_event)
        # LoRAs fused into these weights and switched per batch (int8 text encoders: unfused)
        encoders = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        self.lora = LoraSwitcher({"unet": self.unet, **encoders}, s.model_id,
                                 unfused=list(encoders) * (s.text_encoder_dtype == "int8"))
        self._compile()
        self.layered = None  # the UNet layer by layer, for feature caching
        if self.policy.cache_level is not None:
            self.layered = LayeredUNet(self.unet)
            self.layered.check_level(self.policy.cache_level)
        self._costs: dict[tuple[int, ...], UNetCost] = {}

    def _upcast_sdxl_vae(self, parts: Components) -> None:
        """SDXL's VAE overflows in fp16 (its config says force_upcast; StableDiffusionXLPipeline
        decodes it in fp32): an fp16 VAE runs in fp32 here, and a Warning says so. bf16 has
        fp32's range and stays."""
        if (parts.is_sdxl and self.settings.vae_dtype == "fp16" and not self.tiny
                and parts.vae.config.get("force_upcast", False)):
            self.on_event(Warning("vae_dtype: fp16 overflows in this SDXL model's VAE (its "
                                  "config says force_upcast): it runs in fp32; bf16 keeps "
                                  "fp32's range at half the memory"))
            self.settings = self.settings.model_copy(update={"vae_dtype": "fp32"})

    def _prompt_encoder(self, parts: Components) -> PromptEncoder | DualPromptEncoder:
        """SD 1.5: the text encoder's last hidden states. SDXL: both encoders' penultimate ones
        and the second's pooled projection (text/prompts.py)."""
        s = self.settings
        dtype = DTYPES[s.unet_dtype]
        if not parts.is_sdxl:
            return PromptEncoder(self.tokenizer, self.text_encoder, self.device, dtype,
                                 s.prompt.weighting, expansions(self.embeddings), self.on_event)
        encoders = [PromptEncoder(tokenizer, encoder, self.device, dtype, s.prompt.weighting,
                                  expansions(self.embeddings, index), self.on_event,
                                  hidden_layer=-2)
                    for index, (tokenizer, encoder) in enumerate((
                        (parts.tokenizer, self.text_encoder),
                        (parts.tokenizer_2, self.text_encoder_2)))]
        return DualPromptEncoder(*encoders, parts.force_zeros_for_empty_prompt)

    def _cast_tiny_decoder(self) -> torch.nn.Module:
        """The tiny decoder in the VAE's precision on the device, checked against the UNet."""
        tiny, made = self.tiny, self.unet.config.out_channels
        if tiny.latent_channels != made:
            raise ModelNotFoundError(
                f"tiny_decoder {tiny.reference!r} decodes {tiny.latent_channels}-channel "
                f"latents; model {self.settings.model_id!r} makes {made}-channel ones (SD 1.5: "
                "4, TAESD's taesd_decoder.safetensors; taesd3/taef1 decode 16)")
        theirs, ours = upscaling(tiny.model), upscaling(self.vae)
        if theirs != ours:  # TAESD is made for SD's 8x VAE; the bundled model's VAE is 4x
            self.on_event(Warning(
                f"tiny_decoder {tiny.reference!r} upscales latents {theirs}x, the VAE of "
                f"{self.settings.model_id!r} {ours}x: the latents here are 1/{theirs} of the "
                f"image's size, not the 1/{ours} this model was made for"))
        return cast(tiny.model, self.settings.vae_dtype, self.device).eval()

    def _compile(self) -> None:
        """The UNet and VAE decode callables: compiled when the settings say so (lazily, on the
        first call; the front end loads the compile cache before that call, never this), and
        run with the attention kernel the settings force. `unet_forward` is the UNet as the
        engine calls it (diffusers' forward signature)."""
        s = self.settings
        self.unet_forward = self.unet
        self._vae_decode = self._decode_eager
        self._compiled: list[EagerFallback] = []
        if s.compile.enabled:
            flags = s.optimize.inductor_flags
            self.unet_forward = compile_callable(self.unet, s.compile, "UNet", self.on_event,
                                                  flags)
            self._compiled.append(self.unet_forward)
            if s.compile.compile_vae:
                self._vae_decode = compile_callable(
                    self._decode_eager, s.compile, "VAE decode", self.on_event, flags
                )
                self._compiled.append(self._vae_decode)
        self.unet_forward = with_attention(self.unet_forward, s.optimize.attention)
        self._vae_decode = with_attention(self._vae_decode, s.optimize.attention)

    def _apply_loras(self, loras: Sequence[LoraEntry]) -> tuple[dict, ...]:
        """Make `loras` the set in force. Frozen weights (compile.freezing) are constants of the
        compiled UNet, and those inductor pre-packs (convolutions; linear layers where oneDNN
        packs them) are copies blind to weights changed in place: a switch compiles the UNet
        again. Dynamo keeps compiled graphs per code object, whatever the wrapper, so that takes
        `torch.compiler.reset()`: every compiled model of this process compiles again at its next
        call (a server or a prompts file with frozen weights should not switch LoRAs often)."""
        switches = self.lora.switches
        records = self.lora.apply(loras)
        s = self.settings
        if self.lora.switches != switches and s.compile.enabled and s.compile.freezing:
            torch.compiler.reset()
            self._compile()
        return records

    def prepare_loras(self, loras: Sequence[LoraEntry]) -> None:
        """Read and check LoRA files (errors name the file) without changing the set in force:
        a prompts file's lines, before anything is generated."""
        self.lora.prepare(loras)

    def check_size(self, height: int, width: int) -> None:
        """ConfigError unless this model can generate height x width."""
        multiple = self._size_multiple()
        for key, value in (("generation.height", height), ("generation.width", width)):
            if value % multiple:
                nearest = max(1, round(value / multiple)) * multiple
                raise ConfigError(
                    f"{key}: {value} is not a multiple of {multiple}, which model "
                    f"{self.settings.model_id!r} needs (nearest: {nearest})", key=key)

    def _size_multiple(self) -> int:
        # The UNet halves the latent at every down block but the last.
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def compile_fallbacks(self) -> tuple[str, ...]:
        """The compiled parts ("UNet", "VAE decode") running eagerly because compiling them
        failed (each told once by a Warning event); empty when nothing fell back."""
        return tuple(part.what for part in self._compiled if part.fell_back)

    @property
    def compile_fell_back(self) -> bool:
        """True when a torch.compile failed and its part now runs eagerly."""
        return bool(self.compile_fallbacks)

    # ------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(
        self, prompts: Sequence[str], negative_prompt: str = "",
        seed: int | Sequence[int] | None = None, generation: GenerationSettings | None = None,
        sampler: SamplerSettings | None = None, loras: Sequence[LoraEntry] | None = None,
        on_step: StepCallback | None = None, start: ImageStart | None = None,
        hires: HiresSettings | None = None,
    ) -> list[ImageResult]:
        """One batch: every prompt x num_images_per_prompt, ordered prompt-major as diffusers.

        Image k of the batch is drawn from its own generator seeded `seed + k` (or `seed[k]`,
        one seed per image: a server merging requests), so any image can be regenerated alone
        from the seed in its metadata. `generation` (size, guidance, images per prompt,
        strength) and `sampler` (name, steps) replace the settings' own for this batch. `loras`
        (settings entries) too: fused before the batch, or nothing done when they are the ones
        in force. `on_step(StepState)` is called after every step; it may return new latents.
        `start`: init images (and masks) to start from (image to image, inpainting) at
        `generation.strength`. `hires`: the hires fix's settings for this batch (default: the
        settings' `hires`).
        """
        g, sampler = self._check_request(generation, sampler)
        hires = self.settings.hires if hires is None else hires
        self._check_start(start, hires)
        lora_records = self._apply_loras(self.settings.loras if loras is None else loras)
        self.check_prompts([*prompts, negative_prompt])
        image_prompts = [p for p in prompts for _ in range(g.num_images_per_prompt)]
        seeds = self._seeds(seed, len(image_prompts))
        scheduler = self._prepare_timesteps(sampler)
        # Progress counts UNet calls: the plan's steps, but Heun's 2n - 1 for n steps.
        self.on_event(BatchStarted(len(seeds), len(scheduler.timesteps), tuple(prompts)))
        started = time.perf_counter()
        conditioning = self._conditioning(prompts, negative_prompt, g)
        begin = self._prepare_start(seeds, scheduler, g, sampler, start, len(prompts))
        out = self._denoise(begin, conditioning, g, on_step)
        plans = self._announce_plans(out, image_prompts, seeds)
        if hires.enabled:  # the results keep the request's size and strength, as A1111's
            out = self._hires_pass(out, seeds, conditioning, g, sampler, hires, on_step)
        images = self.decode(out.latents)
        seconds = time.perf_counter() - started
        self.on_event(BatchDone(len(seeds), max(out.steps), seconds))
        return [
            ImageResult(
                prompt=image_prompts[k], negative_prompt=negative_prompt, seed=seeds[k],
                steps=out.steps[k], nfe=_nfe(out.codes[k], 2 if g.guidance_scale > 1 else 1),
                cost=out.costs[k], decisions=out.codes[k], image=images[k],
                latents=out.latents[k].detach().float().cpu(), seconds=seconds / len(seeds),
                generation=g, plan=plans[k], loras=lora_records,
                embeddings=tuple(e.file.record() for e in self.embeddings),
                decoder=self.tiny.record() if self.tiny else None,
                strength=g.strength if start is not None else None,
                mask_blur=start.mask_blur if start is not None and start.masks else None,
                hires=hires if hires.enabled else None,
            )
            for k in range(len(seeds))
        ]

    # ------------------------------------------------------------------ the stages of generate

    def _check_request(self, generation: GenerationSettings | None,
                       sampler: SamplerSettings | None) -> tuple[GenerationSettings,
                                                                  SamplerSettings]:
        """This batch's generation and sampler settings, checked against the model and the
        adaptive mode (a per-call sampler meets it only here; model_copy() skips validators)."""
        s = self.settings
        if generation is not None:
            self.check_size(generation.height, generation.width)
        sampler = s.sampler if sampler is None else sampler
        if problem := sampler_problem(sampler) or adaptive_problem(s.adaptive, sampler):
            raise ConfigError(problem, key=problem.key)
        return (s.generation if generation is None else generation), sampler

    def check_prompts(self, texts: Sequence[str]) -> None:
        """Warn (once per tag or word) about what in these texts the model will not read as
        meant: LoRA tags, words outside a vocabulary. generate() checks its own prompts; a run
        that knows all of its prompts ahead checks them together, for one warning."""
        texts = list(texts)
        if tags := [t for t in prompt_tags(texts) if t not in self._warned]:
            self._warned.update(tags)
            self.on_event(Warning(f"{', '.join(tags)}: LoRA tags in a prompt are read as plain "
                                  "text here; give LoRAs with --lora FILE:WEIGHT or `loras:`"))
        self._warn_unknown_words(texts)

    def _seeds(self, seed: int | Sequence[int] | None, batch: int) -> list[int]:
        if isinstance(seed, Sequence):
            if len(seed) != batch:
                raise ValueError(f"{len(seed)} seeds for {batch} images")
            return list(seed)
        return image_seeds(self.settings.seed if seed is None else seed, batch)

    def _prepare_timesteps(self, sampler: SamplerSettings):
        """The scheduler on the plan the step policy starts on."""
        scheduler = build_scheduler(sampler.name, self.components.scheduler_config,
                                    sampler.schedule)
        scheduler.set_timesteps(self.policy.steps(sampler.steps), device=self.device)
        return scheduler

    def encode_prompts(self, prompts: Sequence[str], negative_prompt: str,
                       generation: GenerationSettings) -> torch.Tensor:
        """Text embeddings in the UNet's dtype, repeated per image; [uncond; cond] when guided
        (guidance > 1, as diffusers) (text/prompts.py: weights, and long prompts as chunks,
        which make them longer than the text encoder's window; cond and uncond always of one
        length)."""
        return self._conditioning(prompts, negative_prompt, generation).embeddings

    def _conditioning(self, prompts: Sequence[str], negative_prompt: str,
                      generation: GenerationSettings) -> Conditioning:
        guided = generation.guidance_scale > 1.0
        cond, pooled = self.prompts.encode_pooled(list(prompts),
                                                  negative_prompt if guided else None)
        per_prompt = generation.num_images_per_prompt  # rows repeated prompt-major
        return Conditioning(cond.repeat_interleave(per_prompt, dim=0),
                            pooled.repeat_interleave(per_prompt, dim=0)
                            if self.components.is_sdxl else None)

    def _check_start(self, start: ImageStart | None, hires: HiresSettings) -> None:
        """Refuse what cannot start from an image: the re-planning policy plans from the first
        step of a plan, which an image start skips."""
        if (start is not None or hires.enabled) and self.policy.name == "replan":
            raise ConfigError("adaptive.mode: replan re-plans from the start of the plan, which "
                              "image to image, inpainting and the hires fix skip; use per_step "
                              "or turn adaptive off", key="adaptive.mode")
        if start is not None and start.masks is not None and (
                len(start.masks) != len(start.images)):
            raise ConfigError(f"{len(start.masks)} masks for {len(start.images)} init images: "
                              "give one mask per image", key="mask")

    def _generators(self, seeds: list[int]) -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(k) for k in seeds]

    def _prepare_start(self, seeds: list[int], scheduler, g: GenerationSettings,
                       sampler: SamplerSettings, start: ImageStart | None, prompts: int) -> Track:
        """The batch's first latents, on the plan's entry it begins at: noise, or the init
        images' latents (inpainting: with what the loop adds, engine/starts.py)."""
        generators = self._generators(seeds)
        track = Track(torch.arange(len(seeds)), None, generators, scheduler,
                      sampler.eta_in_force)
        if start is None:
            shape = (self.unet.config.in_channels, g.height // self.vae_scale_factor,
                     g.width // self.vae_scale_factor)
            track.latents = noise_for(generators, shape).to(self.device) * (
                scheduler.init_noise_sigma)
            return track
        start = start.for_prompts(prompts)
        per_prompt = g.num_images_per_prompt
        pixels = self._pixels(start.images, g).repeat_interleave(per_prompt, dim=0)
        if start.masks is None:
            begun = image_to_image(self.vae, pixels, generators, scheduler, sampler.steps,
                                   g.strength)
        else:
            masks = self._masks(start.masks, start.mask_blur, g)
            begun = inpainting(self.vae, pixels, masks.repeat_interleave(per_prompt, dim=0),
                               generators, scheduler, sampler.steps, g.strength,
                               self.unet.config.in_channels)
        track.latents, track.index = begun.latents, begun.begin
        track.extra, track.blend = begun.extra, begun.blend
        return track

    def _pixels(self, images: Sequence, g: GenerationSettings) -> torch.Tensor:
        """Init images resized to the batch's size (Lanczos, as diffusers' image processor),
        in [-1, 1]."""
        return self._image_processor.preprocess(list(images), height=g.height,
                                                width=g.width).float()

    def _masks(self, masks: Sequence, blur: int, g: GenerationSettings) -> torch.Tensor:
        """Masks at the batch's size, blurred first when asked (as A1111), then binarized."""
        if blur:
            masks = [self._mask_processor.blur(mask, blur_factor=blur) for mask in masks]
        return self._mask_processor.preprocess(list(masks), height=g.height, width=g.width)

    def _denoise(self, track: Track, conditioning: Conditioning, g: GenerationSettings,
                 on_step: StepCallback | None) -> SampleOutput:
        cache = None
        if self.policy.cache_level is not None:
            cache = FeatureCache(self.layered, self.policy.cache_level,
                                 self.policy.cache_forecast)
        embeddings = conditioning.embeddings
        guider = Guider(self.unet_forward, self.unet_dtype, embeddings, len(track.positions),
                        g.guidance_scale, self.unet_wrappers, cache,
                        self._shallow_cost(track.latents, embeddings), track.extra,
                        conditioning.added(g))
        blend = track.blend

        def step_done(state: StepState) -> torch.Tensor | None:
            latents = blend(state) if blend is not None else None
            if latents is not None:
                state = replace(state, latents=latents)
            costs = state.costs if self.policy.per_image else ()
            self.on_event(StepDone(state.step, state.total_steps, len(state.positions),
                                   state.decisions, costs))
            mine = on_step(state) if on_step is not None else None
            return latents if mine is None else mine

        return sample(track, guider, self.policy, step_done)

    def _hires_pass(self, first: SampleOutput, seeds: list[int], conditioning: Conditioning,
                    g: GenerationSettings, sampler: SamplerSettings, hires: HiresSettings,
                    on_step: StepCallback | None) -> SampleOutput:
        """A1111's hires fix: the first pass upscaled (its latents, or its decoded image), then
        drawn again at `denoising_strength` from fresh generators of the same seeds."""
        multiple = self._size_multiple()
        height, width = (max(multiple, round(side * hires.scale / multiple) * multiple)
                         for side in (g.height, g.width))
        second = g.model_copy(update={"height": height, "width": width,
                                      "strength": hires.denoising_strength})
        sampler = sampler.model_copy(update={"steps": hires.steps or sampler.steps})
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        if hires.upscaler.startswith("latent"):
            mode = "nearest" if hires.upscaler == "latent-nearest" else "bilinear"
            start = torch.nn.functional.interpolate(first.latents, size=latent_size, mode=mode)
        else:  # the decoded image, resized with Lanczos, encoded again
            images = [image.resize((width, height), PIL.Image.LANCZOS)
                      for image in self.decode(first.latents)]
            start = self._pixels(images, second)
        scheduler = self._prepare_timesteps(sampler)
        generators = self._generators(seeds)
        begun = image_to_image(self.vae, start, generators, scheduler, sampler.steps,
                               second.strength)
        track = Track(torch.arange(len(seeds)), begun.latents, generators, scheduler,
                      sampler.eta_in_force, begun.begin)
        out = self._denoise(track, conditioning, second, on_step)
        return SampleOutput(out.latents, first.steps, [a + b for a, b in zip(
            first.codes, out.codes, strict=True)], [a + b for a, b in zip(
                first.costs, out.costs, strict=True)], first.decisions)

    def _announce_plans(self, out: SampleOutput, image_prompts: list[str],
                        seeds: list[int]) -> list[PlanDecided | None]:
        """A PlanDecided event per image a re-planning policy decided for; None for others."""
        plans: list[PlanDecided | None] = [None] * len(seeds)
        for d in out.decisions:
            plans[d.position] = PlanDecided(image_prompts[d.position], seeds[d.position],
                                            d.method, d.score, d.warmup_steps, d.total_steps,
                                            d.max_steps)
            self.on_event(plans[d.position])
        return plans

    def _warn_unknown_words(self, texts: list[str]) -> None:
        """A model that knows only its training captions' words (Components.vocabulary: the
        bundled one) tells of a prompt's other words once each, instead of drawing, say,
        "black" silently as purple. The LoRAs in force add the words their files say they were
        trained on."""
        vocabulary = self.components.vocabulary
        if vocabulary is None:
            return
        text = " ".join(plain_text(text) for text in texts)  # without weighting syntax
        if self.embeddings:  # nor the embeddings' tokens, which are known words now
            names = sorted((e.file.token for e in self.embeddings), key=len, reverse=True)
            text = re.sub("|".join(rf"{re.escape(n)}(_\d+)?" for n in names), " ", text,
                          flags=re.I)
        loras = self.lora.in_force()
        known = set(vocabulary).union(*(lora.trained_words or () for lora in loras))
        new = [w for w in unknown_words(text, known) if w not in self._warned]
        if new:
            self._warned.update(new)
            # A LoRA whose file does not list its training words may teach these.
            silent = [lora.name for lora in loras if lora.trained_words is None]
            unless = (f" (unless the LoRA {', '.join(map(repr, silent))} teaches them: its file "
                      "lists no training words)" if silent else "")
            # The vocabulary, long, is listed in the first such warning only.
            knows = "" if self._told_vocabulary else f" It knows: {', '.join(vocabulary)}"
            self._told_vocabulary = True
            self.on_event(Warning(
                f"{self.components.name} never saw the word(s) {', '.join(map(repr, new))}{unless}"
                f": it ignores them or draws a word it knows instead.{knows}"))

    def _shallow_cost(self, latents: torch.Tensor, embeddings: torch.Tensor) -> float:
        """FLOPs of a shallow call as a fraction of a full one, counted once per size and
        prompt length (chunked prompts make cross-attention longer)."""
        if self.layered is None:
            return 1.0
        shape, context = tuple(latents.shape[1:]), tuple(embeddings.shape[1:])
        key = (*shape, *context)
        if key not in self._costs:
            self._costs[key] = UNetCost(self.unet, self.layered, shape, context,
                                        self.unet_dtype)
        return self._costs[key].fraction(self.policy.cache_level)

    def _decode_eager(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode(latents, return_dict=False)[0]

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list:
        """Final latents (as ImageResult.latents holds them) -> PIL images, with the decoder in
        force: the model's VAE or the tiny decoder."""
        # A tiny decoder's scaling_factor is 1.0: TAESD takes the UNet's latents unscaled.
        scaled = (latents / self.decoder.config.scaling_factor).to(self.vae_dtype)
        pixels = self._vae_decode(scaled).float()
        return self._image_processor.postprocess(pixels, output_type="pil")
