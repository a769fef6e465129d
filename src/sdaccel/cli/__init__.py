"""The `sdaccel` command line. Modules here import no torch at module level: `--help` and shell
completion stay fast, and the engine loads only when a command needs it."""

from __future__ import annotations

import typer

from sdaccel import __version__
from sdaccel.cli.bench import bench
from sdaccel.cli.compile_cache import app as compile_cache_app
from sdaccel.cli.generate import generate
from sdaccel.cli.inspect_config import inspect_config
from sdaccel.cli.serve import serve

app = typer.Typer(
    name="sdaccel",
    help="Fast, lean Stable Diffusion inference, with the cost of every trick measured.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
app.command("generate")(generate)
app.command("inspect-config")(inspect_config)
app.command("bench")(bench)
app.command("serve")(serve)
app.add_typer(compile_cache_app, name="compile-cache")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdaccel {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """Fast, lean Stable Diffusion inference, with the cost of every trick measured."""


def main() -> None:
    app(prog_name="sdaccel")
