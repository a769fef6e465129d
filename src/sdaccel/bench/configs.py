"""What to measure: presets, YAML files and Settings -> labelled configurations, and what each
row's run is (plan, precision, compile) as the report shows it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdaccel.bench.fidelity import pipeline_recipe
from sdaccel.errors import ConfigError
from sdaccel.seeds import image_seeds
from sdaccel.settings import (
    ResolvedSettings,
    Settings,
    canonical_preset,
    layer_over,
    resolve_settings,
)


@dataclass
class BenchConfig:
    label: str
    settings: Settings


ConfigSpec = str | Path | Settings | ResolvedSettings | tuple[str, Any]


def resolve_configs(configs: ConfigSpec | Sequence[ConfigSpec],
                    overrides: Sequence[str] = (),
                    flags: dict[str, Any] | None = None) -> list[BenchConfig]:
    """Preset names, YAML paths (the seed's configs/<name>.yaml names work even where the file
    is not there), Settings objects, or (label, any of those) pairs -> labelled settings, with
    `overrides` (dotted.key=value) and shorthand `flags` applied to each."""
    if isinstance(configs, (str, Path, Settings, ResolvedSettings)):
        configs = [configs]
    resolved = []
    for spec in configs:
        label = None
        if isinstance(spec, tuple):
            label, spec = spec
        config = _resolve_one(spec, list(overrides), flags)
        resolved.append(BenchConfig(label or config.label, config.settings))
    seen: dict[str, int] = {}
    for config in resolved:  # labels name rows: keep them unique
        seen[config.label] = seen.get(config.label, 0) + 1
        if seen[config.label] > 1:
            config.label = f"{config.label}#{seen[config.label]}"
    return resolved


def _resolve_one(spec, overrides: list[str], flags) -> BenchConfig:
    if isinstance(spec, ResolvedSettings):
        spec = spec.settings
    if isinstance(spec, Settings):
        return BenchConfig("settings", layer_over(spec, flags, overrides).settings)
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        resolved = resolve_settings(config=path, flags=flags, overrides=overrides)
        return BenchConfig(path.stem, resolved.settings)
    try:
        preset = canonical_preset(str(spec))
    except ConfigError:
        if path.suffix in (".yaml", ".yml"):
            raise ConfigError(f"config file {str(spec)!r} does not exist (nor is "
                              f"{path.stem!r} a preset name)") from None
        raise
    resolved = resolve_settings(preset, flags=flags, overrides=overrides)
    return BenchConfig(preset, resolved.settings)


def plan_steps(settings: Settings) -> int:
    """The solver's plan: an adaptive re-plan run starts on adaptive.max_steps (its reference
    is that full plan); every other run, per-step adaptive ones included, on sampler.steps."""
    adaptive = settings.adaptive
    if adaptive.enabled and getattr(adaptive, "mode", "replan") == "replan":
        return adaptive.max_steps
    return settings.sampler.steps


def fixed_steps(settings: Settings, steps: int) -> Settings:
    """The same configuration with adaptive compute off and a fixed plan of `steps`."""
    fixed = settings.model_copy(deep=True)
    fixed.adaptive.enabled = False
    fixed.sampler.steps = steps
    return fixed


def device_of(settings: Settings) -> str:
    from sdaccel.engine.loading.precision import resolve_device

    return str(resolve_device(settings.device))


def baseline_key(settings: Settings, dtype: str) -> tuple:
    """Configurations with equal keys share one baseline (and one set of peer rows): the same
    device and precision, everything a diffusers pipeline builds from the settings (model,
    seed, sampler, plan, size, guidance, batch, LoRAs, tiny decoder), and the same reading of
    prompts (prompt.weighting: the baseline is given a long prompt as the engine reads it)."""
    made = json.dumps(pipeline_recipe(settings, plan_steps(settings)), sort_keys=True)
    return (device_of(settings), dtype, made, settings.prompt.weighting)


def precision_label(settings: Settings) -> str:
    return f"{settings.unet_dtype}/{settings.vae_dtype}/{settings.text_encoder_dtype}"


def compile_label(settings: Settings) -> str:
    c = settings.compile
    if not c.enabled:
        return "eager"
    return c.mode + ("+vae" if c.compile_vae else "")


def call_plan(settings: Settings, prompts: Sequence[str], calls: int) -> list[tuple[str, int]]:
    """(prompt, seed) of every call: prompts in turn, call i seeded seed + i x batch, so the
    baseline and every row draw exactly the same noise. Round r of the timed calls is call
    warmup + r for every row."""
    batch = settings.generation.num_images_per_prompt
    return [(prompts[i % len(prompts)], image_seeds(settings.seed, 1, first=i * batch)[0])
            for i in range(calls)]
