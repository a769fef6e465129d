"""Layering and validation: every message names the source, the key and what is valid."""

from pathlib import Path

import pytest

from sdaccel.errors import ConfigError
from sdaccel.settings import PRESET_ALIASES, preset_names, resolve_settings


def resolve(**kwargs):
    kwargs.setdefault("environ", {})
    return resolve_settings(**kwargs)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_layers_in_order_and_sources_recorded(tmp_path):
    cfg = write(tmp_path, "sampler:\n  steps: 30\n  name: ddim\nseed: 1\n"
                          "generation:\n  width: 128\n")
    r = resolve(
        preset="mix-bf16-int8", config=cfg,
        environ={"SDACCEL_SAMPLER__STEPS": "40", "SDACCEL_SEED": "2"},
        flags={"sampler.steps": 50, "seed": None},
        overrides=["sampler.steps=60"],
    )
    s = r.settings
    assert (s.sampler.steps, s.sampler.name, s.seed, s.generation.width) == (60, "ddim", 2, 128)
    assert s.unet_dtype == "bf16"  # from the preset, untouched
    assert r.sources["sampler.steps"] == "--set"
    assert r.sources["sampler.name"] == str(cfg)
    assert r.sources["seed"] == "environment"
    assert r.sources["unet_dtype"] == "preset mix-bf16-int8"
    assert r.sources["compile.fullgraph"] == "default"


def test_flags_beat_environment():
    r = resolve(environ={"SDACCEL_SAMPLER__STEPS": "40"}, flags={"sampler.steps": 7})
    assert r.settings.sampler.steps == 7 and r.sources["sampler.steps"] == "command-line flag"


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads(name):
    assert resolve(preset=name).preset == name


@pytest.mark.parametrize(("alias", "name"), PRESET_ALIASES.items())
def test_seed_file_names_are_aliases(alias, name):
    assert resolve(preset=alias + ".yaml").settings == resolve(preset=name).settings


def test_seed_preset_contents():
    s = resolve(preset="sd15_mix_bf16_int8_dpm10").settings
    assert (s.unet_dtype, s.vae_dtype, s.text_encoder_dtype) == ("bf16", "bf16", "int8")
    assert (s.sampler.name, s.sampler.steps) == ("dpm_solver++", 10)
    base = resolve(preset="base_sd15").settings
    assert base.adaptive.enabled and base.adaptive.uncertainty.method == "pred_var"


def test_seed_yaml_loads_unchanged(tmp_path):
    """The seed README's example, verbatim."""
    seed_yaml = """\
model_id: "stable-diffusion-v1-5/stable-diffusion-v1-5"
device: "cuda"
unet_dtype: "bf16"          # UNet precision: "fp32" | "fp16" | "bf16"
vae_dtype: "bf16"
text_encoder_dtype: "int8"
seed: 42
compile:
  enabled: true
  mode: "reduce-overhead"
  fullgraph: false
  dynamic: false
  compile_vae: false
sampler:
  name: "dpm_solver++"
  steps: 10
adaptive:
  enabled: true
  warmup_steps: 5
  min_steps: 5
  max_steps: 20
  uncertainty:
    method: "pred_var"
    threshold_low: 0.10
    threshold_high: 0.25
generation:
  height: 512
  width: 512
  guidance_scale: 7.5
  num_images_per_prompt: 1
io:
  out_dir: "outputs/sd15_mix_bf16_int8_ddpm50"
  save_latents: false
  save_grid: true
"""
    s = resolve(config=write(tmp_path, seed_yaml)).settings
    assert s.compile.enabled and s.adaptive.max_steps == 20
    assert str(s.io.out_dir) == "outputs/sd15_mix_bf16_int8_ddpm50"


@pytest.mark.parametrize(("yaml_text", "expected"), [
    ("sampler:\n  stepz: 3\n", ["cfg.yaml", "sampler.stepz", "unknown key", "name, steps"]),
    ("colour: red\n", ["cfg.yaml", "colour", "unknown key", "model_id"]),
    ("sampler:\n  name: plms\n", ["cfg.yaml", "sampler.name", "'ddpm'", "'dpm_solver++'",
                                  "'plms'"]),
    ("unet_dtype: fp8\n", ["unet_dtype", "'fp32', 'fp16', 'bf16' or 'auto'"]),
    ("compile:\n  mode: turbo\n", ["compile.mode", "'reduce-overhead'", "'max-autotune'"]),
    ("adaptive:\n  min_steps: 30\n  max_steps: 20\n", ["cfg.yaml", "adaptive",
                                                      "min_steps (30) must not exceed max_steps"]),
    ("generation:\n  height: 500\n", ["generation.height", "multiple of 8", "500"]),
    ("device: gpu\n", ["device", "valid: cpu, cuda, cuda:N, auto"]),
    ("sampler: [1, 2]\n", ["sampler"]),
    ("- a\n- b\n", ["cfg.yaml", "must be a mapping"]),
    ("sampler: {name: ddim\n", ["cfg.yaml", "not valid YAML"]),
])
def test_bad_config_file_is_named(tmp_path, yaml_text, expected):
    with pytest.raises(ConfigError) as info:
        resolve(config=write(tmp_path, yaml_text))
    for fragment in expected:
        assert fragment in str(info.value)


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml.*does not exist"):
        resolve(config=tmp_path / "nope.yaml")


def test_unknown_environment_variable_is_an_error():
    with pytest.raises(ConfigError, match="SDACCEL_SAMPLR__STEPS.*sampler.steps"):
        resolve(environ={"SDACCEL_SAMPLR__STEPS": "3"})


def test_bad_environment_value_names_the_layer():
    with pytest.raises(ConfigError, match="environment: sampler.steps"):
        resolve(environ={"SDACCEL_SAMPLER__STEPS": "many"})


def test_tool_environment_variables_are_not_settings():
    assert resolve(environ={"SDACCEL_CACHE_DIR": "/tmp/x"}).settings


@pytest.mark.parametrize(("assignment", "expected"), [
    ("sampler.steps", "expected dotted.key=value"),
    ("sampler.stepz=3", "--set: sampler.stepz: unknown key"),
    ("seed.x=3", "--set: seed: Input should be a valid integer"),
    ("sampler.steps=0", "--set: sampler.steps"),
    ("model_id=[a", "the value is not valid YAML"),
])
def test_bad_set(assignment, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        resolve(overrides=[assignment])


def test_set_parses_yaml_scalars():
    s = resolve(overrides=["compile.enabled=true", "generation.guidance_scale=1",
                           "io.out_dir=some/where"]).settings
    assert s.compile.enabled is True and s.generation.guidance_scale == 1.0
    assert str(s.io.out_dir) == "some/where"


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown preset 'fast'.*tiny.*sd15_fp32_ddpm50"):
        resolve(preset="fast")


def test_several_errors_reported_together(tmp_path):
    with pytest.raises(ConfigError) as info:
        resolve(config=write(tmp_path, "seed: -1\nsampler:\n  steps: 0\n"))
    assert "seed" in str(info.value) and "sampler.steps" in str(info.value)


def test_layer_over_changes_only_the_named_keys():
    from sdaccel.settings import layer_over

    base = resolve(preset="tiny", overrides=["seed=5", "generation.guidance_scale=2"]).settings
    layered = layer_over(base, {"sampler.steps": 7, "seed": None}, ["generation.width=48"])
    assert (layered.settings.sampler.steps, layered.settings.generation.width) == (7, 48)
    assert layered.settings.seed == 5 and layered.settings.generation.guidance_scale == 2
    assert layered.sources["sampler.steps"] == "command-line flag"
    assert layered.sources["generation.width"] == "--set"
    assert layered.sources["seed"] == "given settings"
    assert base.sampler.steps != 7  # the given settings are not changed


# --------------------------------------------------------------------------- samplers


def test_schedule_and_eta_default_to_the_samplers_own():
    s = resolve(overrides=["sampler.name=tcd"]).settings
    assert (s.sampler.schedule, s.sampler.eta, s.sampler.eta_in_force) == ("default", None, 0.3)
    s = resolve(overrides=["sampler.name=ddim", "sampler.eta=0.5",
                           "sampler.schedule=trailing"]).settings
    assert (s.sampler.schedule, s.sampler.eta_in_force) == ("trailing", 0.5)
    assert resolve(overrides=["sampler.name=euler"]).settings.sampler.eta_in_force is None


@pytest.mark.parametrize(("overrides", "expected"), [
    # a schedule the sampler's diffusers class does not have
    (["sampler.name=ddim", "sampler.schedule=karras"],
     ["--set", "sampler.schedule 'karras'", "sampler.name 'ddim'", "valid: default, trailing"]),
    (["sampler.name=euler_a", "sampler.schedule=exponential"],
     ["sampler.schedule 'exponential'", "valid: default, trailing"]),
    # one its class ignores: LCM and TCD space their own timesteps
    (["sampler.name=tcd", "sampler.schedule=trailing"],
     ["sampler.schedule 'trailing'", "sampler.name 'tcd'", "valid: default (",
      "ignores timestep_spacing"]),
    (["sampler.name=lcm", "sampler.schedule=karras"], ["sampler.name 'lcm'", "valid: default"]),
    (["sampler.schedule=beta"], ["sampler.schedule", "'default', 'karras', 'exponential' or "
                                 "'trailing'", "'beta'"]),
    # eta where the step takes none, and outside [0, 1]
    (["sampler.name=lcm", "sampler.eta=0.3"],
     ["sampler.eta 0.3", "sampler.name 'lcm' takes no eta", "valid: null", "ddim, tcd"]),
    (["sampler.name=tcd", "sampler.eta=1.5"], ["sampler.eta", "less than or equal to 1", "1.5"]),
    (["sampler.name=ddim", "sampler.eta=-0.1"], ["sampler.eta", "greater than or equal to 0"]),
    # adaptive modes that cannot work with the sampler, and why
    (["sampler.name=lcm", "adaptive.enabled=true"],
     ["adaptive.mode replan", "sampler.name 'lcm' cannot", "few-step sampler",
      "valid: ddpm, dpm_solver++, dpm_solver++_sde, euler", "adaptive.enabled false"]),
    (["sampler.name=tcd", "adaptive.enabled=true", "adaptive.mode=per_step"],
     ["adaptive.mode per_step cannot use sampler.name 'tcd'", "few-step sampler",
      "no plan to re-make", "valid: ddpm, ddim,", "adaptive.enabled false"]),
    (["sampler.name=heun", "adaptive.enabled=true", "adaptive.mode=per_step"],
     ["adaptive.mode per_step", "sampler.name 'heun'", "2 UNet calls a step", "valid: ddpm"]),
    (["sampler.name=heun", "adaptive.enabled=true"],
     ["adaptive.mode replan", "sampler.name 'heun' cannot", "or adaptive.enabled false"]),
    (["sampler.name=unipc", "adaptive.enabled=true"],
     ["sampler.name 'unipc' cannot", "or adaptive.mode per_step"]),
    (["sampler.name=euler", "sampler.schedule=karras", "adaptive.enabled=true"],
     ["adaptive.mode replan", "sampler.schedule 'karras'",
      "valid with replan: default, trailing"]),
])
def test_a_sampler_setting_it_cannot_honour_is_one_line_naming_key_and_valid_values(
        overrides, expected):
    with pytest.raises(ConfigError) as info:
        resolve(overrides=overrides)
    message = str(info.value)
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message, (fragment, message)


def test_samplers_that_adaptive_modes_can_use_still_resolve():
    assert resolve(overrides=["sampler.name=dpm_solver++_sde", "sampler.schedule=trailing",
                              "adaptive.enabled=true"]).settings.adaptive.enabled
    assert resolve(overrides=["sampler.name=unipc", "sampler.schedule=karras",
                              "adaptive.enabled=true", "adaptive.mode=per_step"]).settings
