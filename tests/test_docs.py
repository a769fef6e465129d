"""The documentation: the site builds strictly (a broken link or anchor, a page missing from the
nav, a settings key without a description all fail) and README.md's own links resolve."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Markdown links and images, and the src of raw HTML images.
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|src=\"([^\"]+)\"")


def test_the_site_builds_strictly(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict",
         "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ("index.html", "reference/settings/index.html", "reference/cli/index.html",
                 "reference/presets/index.html", "reference/samplers/index.html",
                 "BENCHMARKS/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "--prompts-file" in cli and "--max-batch" in cli and "compile-cache warm" in cli


def test_every_settings_key_and_section_is_described():
    """The settings reference renders these: a key's trade-off is written once, here."""
    from pydantic import BaseModel

    from sdaccel.settings import Settings

    def walk(model: type[BaseModel], prefix: str = "") -> list[str]:
        missing = [] if (model.__doc__ or "").strip() else [f"{prefix or 'Settings'} (docstring)"]
        for name, info in model.model_fields.items():
            inner = info.annotation
            if getattr(inner, "__origin__", None) is list:
                inner = inner.__args__[0]
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                missing += walk(inner, f"{prefix}{name}.")
            elif not info.description:
                missing.append(prefix + name)
        return missing

    assert walk(Settings) == []


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, each space a hyphen."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.*)$", markdown, re.M):
        text = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower())
        anchors.add(text.replace(" ", "-"))
    return anchors


def test_readme_links_resolve():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    broken = []
    for match in LINK.finditer(readme):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # a URL
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else ROOT / "README.md"
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(
                file.read_text(encoding="utf-8")):
            broken.append(target)
    assert broken == [], f"README.md links to what is not there: {broken}"
