"""`sdaccel inspect-config`: the settings in force, and the layer that set each value."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

from sdaccel.cli import options as opt
from sdaccel.cli.command import SettingsFlags, command


@command(settings="flags")
def inspect_config(
    console: Console,
    settings: SettingsFlags,
    as_json: opt.Json = False,
    list_presets: Annotated[bool, typer.Option("--list-presets", help="List the packaged "
                                               "presets and exit.")] = False,
    skip_device_check: Annotated[bool, typer.Option(
        "--no-device-check", help="Do not check that this machine can run the device and "
        "precisions (and do not import torch).")] = False,
) -> None:
    """Show the resolved settings as YAML (or --json), each value annotated with its source.

    Layers, lowest first: preset < --config < SDACCEL_* environment < flags < --set. Then checks
    that this machine can run the device and precisions (exit code 4 when it cannot).
    """
    if list_presets:
        _print_presets(as_json)
        return
    from sdaccel.settings import settings_as_dict

    resolved = settings.resolve()
    values = settings_as_dict(resolved.settings)
    # The device check comes after the settings are shown: a preset for another machine is
    # still shown, then the command fails (exit code 4).
    choices, device_error, attention = {}, None, resolved.settings.optimize.attention
    if not skip_device_check:
        from sdaccel.engine.loading.precision import choose_precisions, device_for
        from sdaccel.engine.speed.optimize import attention_in_force
        from sdaccel.errors import DeviceError

        attention = attention_in_force(attention)
        try:
            choices = choose_precisions(resolved.settings, device_for(resolved.settings))
        except DeviceError as exc:
            device_error = exc
    if as_json:
        chosen = {key: {"precision": c.precision, "reason": c.reason} for key, c in
                  choices.items()}
        typer.echo(json.dumps({"preset": resolved.preset, "settings": values,
                               "sources": resolved.sources, "precisions": chosen,
                               "attention_in_force": attention}, indent=2))
    else:
        typer.echo(f"# preset: {resolved.preset}")
        typer.echo(annotated_yaml(values, resolved.sources))
        if choices:
            typer.echo("# precisions on this machine:")
        for key, choice in choices.items():
            shown = f"auto -> {choice.precision}" if choice.asked == "auto" else choice.precision
            typer.echo(f"#   {key}: {shown} ({choice.reason})")
        if attention != resolved.settings.optimize.attention:
            from sdaccel.engine.speed.chunked_attention import NOT_HERE

            typer.echo(f"# optimize.attention on this machine: "
                       f"{resolved.settings.optimize.attention} -> {attention} ({NOT_HERE})")
    if device_error is not None:
        raise device_error


def annotated_yaml(values: dict[str, Any], sources: dict[str, str], prefix: str = "",
                   indent: int = 0) -> str:
    """YAML that loads back to `values`, with `# <layer>` after every leaf."""
    lines = []
    for key, value in values.items():
        pad = "  " * indent
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            lines.append(annotated_yaml(value, sources, f"{prefix}{key}.", indent + 1))
        else:
            # One line per leaf whatever its length: a wrapped flow value would lose its comment
            # and, under an indented key, no longer load back.
            rendered = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()
            rendered = rendered.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"{pad}{key}: {rendered}  # {sources.get(prefix + key, 'default')}")
    return "\n".join(lines)


def _print_presets(as_json: bool) -> None:
    from sdaccel.settings import PRESET_ALIASES, preset_description, preset_names

    aliases: dict[str, list[str]] = {}
    for alias, name in PRESET_ALIASES.items():
        aliases.setdefault(name, []).append(alias)
    rows = [{"name": n, "description": preset_description(n), "aliases": aliases.get(n, [])}
            for n in preset_names()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        alias = f"  (alias: {', '.join(r['aliases'])})" if r["aliases"] else ""
        typer.echo(f"{r['name']:<{width}}  {r['description']}{alias}")
