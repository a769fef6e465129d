"""MkDocs hooks (mkdocs.yml `hooks:`): the pages written from the code, and the repository files
the guides link to.

Generated at every build, never stored:

- `reference/settings.md`: every settings key, read from the pydantic models in
  `sdaccel.settings` (its type, default, constraints and description). A key without a
  description, or a section without a docstring, is a warning, so the strict build fails.
- `reference/presets.md`: each packaged preset's description and YAML.
- `reference/samplers.md`: the samplers of `sdaccel.catalogue`.
- `reference/cli.md`: every command, argument and option of the Typer app (`sdaccel.cli`).
- `index.md`: README.md, its links rewritten for the site.

Links: the guides are written so that they read right on GitHub too. A relative link that leaves
`docs/` (`../BENCHMARKS.md`, `../examples/frontier.md`) names a repository file; that file is
copied into the site at its repository path and the link rewritten to it. A link to a file that
does not exist is left alone, and the strict build fails on it.
"""

from __future__ import annotations

import inspect
import logging
import posixpath
import re
import types
import typing
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.sdaccel")

# Repository files in the site's "Results" and "Project" sections even where no page links them.
ALWAYS_MIRRORED = ("BENCHMARKS.md", "CHANGELOG.md", "examples/*.md", "examples/*.png",
                   "src/sdaccel/bundled/*/README.md")
LINK = re.compile(r"(\]\(|src=\")([^)\s\"]+)")
_repo_of_page: dict[str, str] = {}  # site src_uri -> the repository path it comes from


# --------------------------------------------------------------------------- files and links


def on_files(files: Files, config: Any) -> Files:
    root = Path(config.config_file_path).resolve().parent
    docs = Path(config.docs_dir).resolve().relative_to(root).as_posix()
    _repo_of_page.clear()
    for file in files:
        _repo_of_page[file.src_uri] = f"{docs}/{file.src_uri}"

    readme = (root / "README.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "index.md", content=readme))
    _repo_of_page["index.md"] = "README.md"
    for name, content in _reference_pages().items():
        files.append(File.generated(config, name, content=content))

    wanted = [p.relative_to(root).as_posix() for pattern in ALWAYS_MIRRORED
              for p in sorted(root.glob(pattern))]
    pending = [repo for repo in _repo_of_page.values() if repo.endswith(".md")] + wanted
    seen: set[str] = set()
    while pending:  # the pages' links, and a mirrored page's own links in turn
        repo = pending.pop()
        path = root / repo
        if repo in seen or not path.is_file():
            continue
        seen.add(repo)
        if not repo.startswith(f"{docs}/") and repo not in _repo_of_page.values():
            files.append(File.generated(config, repo, abs_src_path=str(path)))
            _repo_of_page[repo] = repo
        if repo.endswith(".md"):
            pending += _linked_repo_paths(path.read_text(encoding="utf-8"), repo)
    return files


def _linked_repo_paths(markdown: str, repo_path: str) -> list[str]:
    """Repository paths of the relative links in a page that lives at `repo_path`."""
    found = []
    for _, target in LINK.findall(markdown):
        path = _relative_target(target)
        if path is not None:
            found.append(posixpath.normpath(posixpath.join(posixpath.dirname(repo_path), path)))
    return found


def _relative_target(target: str) -> str | None:
    if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("#", "/")):
        return None
    return target.split("#", 1)[0].split("?", 1)[0] or None


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Links written for the repository (README's `docs/x.md`, a guide's `../BENCHMARKS.md`)
    pointed at the same files in the site."""
    src_uri = page.file.src_uri
    repo_path = _repo_of_page.get(src_uri)
    if repo_path is None:
        return markdown
    docs = Path(config.docs_dir).resolve().relative_to(
        Path(config.config_file_path).resolve().parent).as_posix()
    site_of_repo = {repo: site for site, repo in _repo_of_page.items()}

    def rewrite(match: re.Match) -> str:
        prefix, target = match.groups()
        path = _relative_target(target)
        if path is None:
            return match.group(0)
        anchor = target[len(path):]
        repo = posixpath.normpath(posixpath.join(posixpath.dirname(repo_path), path))
        site = site_of_repo.get(repo)
        if site is None and repo.startswith(f"{docs}/"):
            site = repo[len(docs) + 1:]
        if site is None:
            return match.group(0)  # not in the site: the strict build reports it
        new = posixpath.relpath(site, posixpath.dirname(src_uri) or ".")
        if prefix == 'src="' and not site.endswith(".md"):
            # Raw HTML is not rewritten by MkDocs: make it relative to the page's own URL.
            depth = 0 if src_uri.endswith(("index.md", "README.md")) else 1
            new = "../" * depth + new if config.use_directory_urls else new
        return prefix + new + anchor

    return LINK.sub(rewrite, markdown)


# --------------------------------------------------------------------------- reference pages


def _reference_pages() -> dict[str, str]:
    return {
        "reference/settings.md": settings_reference(),
        "reference/presets.md": presets_reference(),
        "reference/samplers.md": samplers_reference(),
        "reference/cli.md": cli_reference(),
    }


def _cell(text: str) -> str:
    """One Markdown table cell: whitespace folded, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _escape(text: str) -> str:
    """Plain help text as Markdown: emphasis and HTML characters escaped outside `code`."""
    parts = re.split(r"(`[^`]*`)", text)
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(r"([\\*_\[\]<>])", r"\\\1", parts[i])
    return "".join(parts)


def _type_name(annotation: Any) -> str:
    from pydantic import BaseModel

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or `null`" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _default(info: Any) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return "`[]`" if not value else f"`{value}`"
    return f"`{value}`"


def _constraints(info: Any) -> str:
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    found = []
    for item in info.metadata:
        for attr, sign in words.items():
            bound = getattr(item, attr, None)
            if bound is not None:
                power = isinstance(bound, int) and bound > 2**16 and not bound & (bound - 1)
                found.append(f"{sign} 2^{bound.bit_length() - 1}" if power else f"{sign} {bound}")
    return ", ".join(found)


def _sections(model: type, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted prefix, model) for the model and every section below it, depth first."""
    from pydantic import BaseModel

    found = [(prefix, model)]
    for name, info in model.model_fields.items():
        annotation = info.annotation
        inner = typing.get_args(annotation)[0] if typing.get_origin(annotation) is list else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += _sections(annotation, f"{prefix}{name}.")
        elif isinstance(inner, type) and issubclass(inner, BaseModel):
            found += _sections(inner, f"{prefix}{name}[].")
    return found


def settings_reference() -> str:
    from pydantic import BaseModel

    from sdaccel import settings as s

    lines = [
        "# Settings reference",
        "",
        "Generated from `sdaccel.settings` at every build: this page is what the code accepts.",
        "How the layers combine (preset, `--config`, `SDACCEL_*` environment variables, flags, "
        "`--set`) is in the [settings guide](../settings.md). Every key below can be set in a "
        "YAML file, as `--set dotted.key=value`, or as `SDACCEL_<KEY>` with sections joined by "
        "`__` (`SDACCEL_SAMPLER__STEPS=12`). Unknown keys and values out of range are errors "
        "that name the layer that set them.",
        "",
    ]
    for prefix, model in _sections(s.Settings):
        title = prefix.rstrip(".") or "top level"
        doc = model.__doc__ or ""
        if not doc.strip() or doc is BaseModel.__doc__:
            log.warning("settings reference: %s (%s) has no docstring", title, model.__name__)
            doc = ""
        lines += [f'## `{title}` {{#{model.__name__.lower()}}}' if prefix else
                  f"## Top level {{#{model.__name__.lower()}}}", "",
                  _escape_doc(doc), "",
                  "| key | type | default | description |", "|---|---|---|---|"]
        for name, info in model.model_fields.items():
            annotation = info.annotation
            is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
            description = info.description or ""
            if is_section:
                first = inspect.cleandoc(annotation.__doc__ or "").split(". ")[0].rstrip(".")
                description = description or (f"{first}. The section's keys: "
                                              f"[below](#{annotation.__name__.lower()}).")
            elif not description:
                log.warning("settings reference: %s%s has no description", prefix, name)
            limits = _constraints(info)
            type_text = ("section" if is_section else _type_name(annotation)) + (
                f" ({limits})" if limits else "")
            default = "" if is_section else _default(info)
            lines.append(f"| `{prefix}{name}` | {_cell(type_text)} | {_cell(default)} | "
                         f"{_cell(description)} |")
        lines.append("")
    return "\n".join(lines)


def _escape_doc(doc: str) -> str:
    """A class docstring as Markdown paragraphs (its indentation removed)."""
    return inspect.cleandoc(doc)


def presets_reference() -> str:
    from importlib import resources

    from sdaccel import settings as s

    lines = [
        "# Presets",
        "",
        "Generated from the YAML files in `src/sdaccel/presets/` at every build. A preset is the "
        "lowest settings layer (`--preset NAME`, default `tiny`); anything it does not set keeps "
        "the [default](settings.md). `sdaccel inspect-config --list-presets` lists them, and "
        "`sdaccel inspect-config --preset NAME` shows a preset resolved, with the layer of each "
        "value.",
        "",
    ]
    aliases = {}
    for alias, name in s.PRESET_ALIASES.items():
        aliases.setdefault(name, []).append(alias)
    for name in s.preset_names():
        text = (resources.files("sdaccel.presets") / f"{name}.yaml").read_text()
        comment = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            comment.append(line.lstrip("# ").strip())
        also = (f" The seed's file name `{'`, `'.join(aliases[name])}` works too."
                if name in aliases else "")
        lines += [f"## `{name}`", "", _escape(" ".join(comment)) + also, "",
                  "```yaml", text.rstrip(), "```", ""]
    return "\n".join(lines)


def samplers_reference() -> str:
    from sdaccel import catalogue as c

    lines = [
        "# Samplers",
        "",
        "Generated from `sdaccel.catalogue.SAMPLER_TABLE` at every build. `sampler.name` picks "
        "the solver: each is the diffusers scheduler class below, built over the model's own "
        "scheduler config with the options shown, and gives `StableDiffusionPipeline`'s latents "
        "(fp32, tested for every sampler, schedule and a range of eta). The "
        "[settings guide](../settings.md#samplers-and-schedules) explains schedules and eta.",
        "",
        "| `sampler.name` | A1111 label | diffusers class (options) | `sampler.schedule` | "
        "eta default | adaptive modes |",
        "|---|---|---|---|---|---|",
    ]
    notes = []
    for e in c.SAMPLER_TABLE:
        options = ", ".join(f"`{k}={v!r}`" for k, v in e.options.items())
        cls = f"`{e.scheduler}`" + (f" ({options})" if options else "")
        modes = [m for m, ok in (("replan", e.replannable), ("per_step", e.per_step)) if ok]
        eta = "" if e.eta is None else f"{e.eta:g} (`{e.eta_label}`)"
        lines.append(f"| `{e.name}` | {_cell(e.a1111)} | {_cell(cls)} | "
                     f"{', '.join(e.schedules)} | {eta} | {', '.join(modes) or 'none'} |")
        if e.not_adaptive:
            notes.append(f"- `{e.name}`, adaptive compute: {_escape(e.not_adaptive)}.")
        if e.own_schedule:
            notes.append(f"- `{e.name}`, schedule: {_escape(e.own_schedule)}.")
    schedules = ", ".join(f"`{k}` ({c.SCHEDULE_LABELS[k]}"
                          + (": " + ", ".join(f"`{o}={v!r}`" for o, v in opts.items())
                             if opts else ": the model's own config") + ")"
                          for k, opts in c.SCHEDULE_OPTIONS.items())
    lines += ["", *notes, "",
              f"Schedules (A1111's label, the diffusers options): {schedules}.", "",
              f"Samplers that can re-plan (`adaptive.mode: replan`): "
              f"{', '.join(f'`{n}`' for n in c.REPLANNABLE)}. Per-step adaptive compute "
              f"(`adaptive.mode: per_step`): {', '.join(f'`{n}`' for n in c.PER_STEP)}. "
              f"Samplers that take `sampler.eta`: {', '.join(f'`{n}`' for n in c.TAKE_ETA)}.",
              "", f"Uncertainty estimators (`adaptive.uncertainty.method`): "
              f"{', '.join(f'`{n}`' for n in c.ESTIMATORS)}.", ""]
    return "\n".join(lines)


def cli_reference() -> str:
    import typer

    from sdaccel.cli import app

    root = typer.main.get_command(app)
    lines = [
        "# Command line reference",
        "",
        "Generated from the Typer app (`sdaccel.cli`) at every build: the same text as "
        "`sdaccel COMMAND --help`. Options under *Shorthand settings* each set one "
        "[settings key](settings.md); `--preset`, `--config` and `--set` are the settings "
        "layers ([settings guide](../settings.md)).",
        "",
    ]
    with root.context_class(root, info_name="sdaccel") as ctx:
        lines += _command_lines(root, ctx, "sdaccel", level=2)
    return "\n".join(lines)


# Typer's own options that say nothing about sdaccel.
_SKIPPED = {"help", "install_completion", "show_completion"}


def _command_lines(cmd: Any, ctx: Any, path: str, level: int) -> list[str]:
    """A command's usage, help and parameters, then its subcommands'. Typer ships its own copy
    of click, so parameters are told apart by `param_type_name`, not by click's classes."""
    lines = []
    if path != "sdaccel":
        lines += [f"{'#' * level} `{path}`", ""]
    usage = cmd.collect_usage_pieces(ctx)
    lines += ["```text", f"{path} {' '.join(usage)}".rstrip(), "```", ""]
    if cmd.help:
        lines += [_escape(_plain_help(cmd.help)), ""]
    params = [p for p in cmd.get_params(ctx) if p.name not in _SKIPPED]
    panels: dict[str, list[str]] = {}
    for p in params:
        # As `--help` shows it: names and value type, then the help with its default.
        names, help_text = p.get_help_record(ctx) or (p.name, "")
        if p.multiple and "repeat" not in help_text.lower():
            help_text += " (repeatable)"
        envvar = f" Environment: `{p.envvar}`." if isinstance(p.envvar, str) else ""
        panel = ("Arguments" if p.param_type_name == "argument"
                 else getattr(p, "rich_help_panel", None) or "Options")
        panels.setdefault(panel, []).append(
            f"| `{_cell(names)}` | {_cell(_escape(help_text))}{envvar} |")
    for panel, rows in panels.items():
        lines += [f"*{panel}*", "", "| | |", "|---|---|", *rows, ""]
    if hasattr(cmd, "list_commands"):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            with sub.context_class(sub, info_name=name, parent=ctx) as sub_ctx:
                lines += _command_lines(sub, sub_ctx, f"{path} {name}",
                                        level if path == "sdaccel" else level + 1)
    return lines


def _plain_help(text: str) -> str:
    """Typer/click help text: `\\b` markers dropped, paragraphs kept."""
    return inspect.cleandoc(text.replace("\b", ""))
