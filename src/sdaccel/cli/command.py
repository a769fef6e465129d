"""The scaffold every command runs in: the stderr console, errors as one line and an exit code,
quiet library logs, and the settings flags declared once.

A command is written as `def name(console, settings, <its own options>)` under
`@command(...)`; the decorator adds the shared settings options to the signature Typer reads,
resolves them (so every command layers settings the same way) and maps errors, so a command
body holds only what is particular to it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import typer
from rich.console import Console
from rich.markup import escape

from sdaccel.cli import options as opt
from sdaccel.errors import SdaccelError

EXIT_INTERRUPTED = 130

_LAYERS = {"one": {"preset": opt.Preset, "config": opt.ConfigFile},
           "many": {"preset": opt.Presets, "config": opt.Configs}}


@dataclass(frozen=True)
class SettingsFlags:
    """What the command line said about settings, before layering.

    `preset`/`config` are single values for most commands and lists for `bench` (one row
    each); `shorthand` maps settings keys to flag values (None: not given)."""

    preset: Any = None
    config: Any = None
    overrides: list[str] = field(default_factory=list)
    shorthand: dict[str, Any] = field(default_factory=dict)

    def resolve(self):
        """The settings in force: preset < --config < environment < flags < --set."""
        from sdaccel.settings import resolve_settings

        return resolve_settings(self.preset, self.config, self.shorthand, self.overrides)


@contextmanager
def reported_errors(console: Console) -> Iterator[None]:
    """Show a user error as `Error: ...` and exit with its code; never a traceback."""
    try:
        yield
    except SdaccelError as exc:
        console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted.[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def stdout_console() -> Console:
    """The console for a command's result (tables); files and pipes get every column unwrapped."""
    out = Console()
    return out if out.is_terminal else Console(width=240)


def quiet_library_logs() -> None:
    """Libraries' notices that a user cannot act on stay out of the output (errors still show):
    bitsandbytes' note on an optional 4-bit kernel, diffusers' remarks on dtype casts. The
    libraries set their own loggers' levels when first imported, hence their own API here.

    Also keeps diffusers from importing bitsandbytes with its models (`defer_bitsandbytes`)."""
    import logging

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # bitsandbytes' CPU backend looks for an optional 4-bit kernel on import, through the
    # `kernels` package, which warns when the Hub is offline (every offline run with int8).
    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()  # "Loading weights" bars: our own progress is enough
    defer_bitsandbytes()


def defer_bitsandbytes() -> None:
    """Let diffusers' model classes load without importing bitsandbytes (about 1 s, the import
    that on some CPUs also asks the Hub for an optional kernel): sdaccel's int8 casts import it
    themselves (engine/loading/precision.py) and never use diffusers' bitsandbytes quantizer.
    diffusers decides once, when `diffusers.models` is first imported, from the flag set here;
    a process that has already imported them, or a diffusers without the flag, is left as is.
    A command process only: a library user's process keeps diffusers' own behaviour."""
    import sys

    from diffusers.utils import import_utils

    if "diffusers.models.modeling_utils" in sys.modules or \
            not hasattr(import_utils, "_bitsandbytes_available"):
        return
    import_utils._bitsandbytes_available = False


def command(
    settings: Literal["resolved", "flags"] | None = "resolved",
    *,
    presets: Literal["one", "many"] = "one",
    exclude: tuple[str, ...] = (),
    aliases: dict[str, Any] | None = None,
    engine: bool = False,
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Make `func(console, [settings,] **own_options)` a Typer command.

    settings: "resolved" hands the command a ResolvedSettings, "flags" the SettingsFlags (for
    commands that resolve several configurations), None adds no settings options. presets:
    "many" takes --preset/--config as lists. Every shorthand flag of `options.SHORTHAND` is
    taken but those in `exclude` (flags meaningless to the command, e.g. --out-dir where no
    image is written); aliases: a different option alias for one of them (e.g. compile-cache's
    --batch).
    engine: the command loads models, so library notices are silenced first.
    """

    def decorate(func: Callable[..., None]) -> Callable[..., None]:
        added = _settings_parameters(presets, exclude, aliases or {}) if settings else []
        names = [p.name for p in added]

        @functools.wraps(func)
        def run(**kwargs: Any) -> None:
            console = Console(stderr=True, soft_wrap=True)
            with reported_errors(console):
                arguments: dict[str, Any] = {"console": console}
                if settings:
                    flags = _flags({name: kwargs.pop(name) for name in names})
                    arguments["settings"] = flags.resolve() if settings == "resolved" else flags
                if engine:
                    quiet_library_logs()
                func(**arguments, **kwargs)

        parameters = _own_parameters(func) + added
        run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return run

    return decorate


def _own_parameters(func: Callable[..., None]) -> list[inspect.Parameter]:
    """The command's own options with their annotations evaluated (the module may postpone
    them); `console` and `settings` are supplied by the scaffold, not by Typer."""
    own = []
    for name, parameter in inspect.signature(func).parameters.items():
        if name in ("console", "settings"):
            continue
        annotation = parameter.annotation
        if isinstance(annotation, str):
            annotation = eval(annotation, func.__globals__)  # noqa: S307 - our own source
        own.append(parameter.replace(annotation=annotation))
    return own


def _settings_parameters(presets: str, exclude: tuple[str, ...],
                         aliases: dict[str, Any]) -> list[inspect.Parameter]:
    unknown = set(exclude) - set(opt.SHORTHAND)
    assert not unknown, f"exclude names no shorthand flag: {unknown}"
    declared = {**_LAYERS[presets], "overrides": opt.Overrides,
                **{name: aliases.get(name, alias) for name, (_, alias) in opt.SHORTHAND.items()
                   if name not in exclude}}
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                              annotation=alias) for name, alias in declared.items()]


def _flags(values: dict[str, Any]) -> SettingsFlags:
    shorthand = {opt.SHORTHAND[name][0]: _plain(value) for name, value in values.items()
                 if name in opt.SHORTHAND}
    return SettingsFlags(values["preset"], values["config"], list(values["overrides"] or []),
                         shorthand)


def _plain(value: Any) -> Any:
    if isinstance(value, list | tuple):  # a repeatable flag: not given when empty
        return [_plain(item) for item in value] or None
    return str(value) if isinstance(value, Path) else value
