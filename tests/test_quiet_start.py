"""A quiet, quick start: a run prints only what sdaccel says, imports no library it does not use
(bitsandbytes without int8), and `--help` shows every character of every help text."""

import os
import re
import subprocess
import sys

import pytest
import typer.main
from rich.markup import render

from sdaccel.cli import app


def _commands(command, path=("sdaccel",)):
    yield " ".join(path), command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = dict(_commands(typer.main.get_command(app)))


@pytest.mark.parametrize("name", COMMANDS)
def test_help_texts_are_shown_whole(name):
    """Help is Rich markup: an unescaped `[word]` ("sdaccel[peers]", "[default: tiny]") is read
    as a style tag and vanishes from --help. Each text must render to itself (`\\[` is a
    literal bracket)."""
    command = COMMANDS[name]
    texts = {"(command)": command.help or ""}
    texts.update({param.name: getattr(param, "help", None) or "" for param in command.params})
    lost = {key: text for key, text in texts.items()
            if render(text).plain != text.replace("\\[", "[")}
    assert not lost, f"{name}: help read as markup (escape '[' as '\\\\['): {lost}"


@pytest.mark.slow
def test_a_run_prints_only_ours_and_imports_no_bitsandbytes(tmp_path):
    """`sdaccel generate` offline, as the issue ran it: no third-party notice (bitsandbytes'
    hub-kernel lookup printed one before anything of ours), and bitsandbytes, which only an
    int8 part uses, is not imported at all (it cost about a second of every start)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sdaccel", "generate", "a red circle",
         "--preset", "tiny", "--steps", "2", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines
                if line.startswith("import time:")}
    assert "diffusers.models.modeling_utils" in imported  # the import that pulled it in
    assert not {m for m in imported if m.split(".")[0] == "bitsandbytes"}
    said = [line for line in lines if not line.startswith("import time:")]
    assert said[0].startswith("preset tiny, model bundled:shapes"), said[:3]
    noise = [line for line in said + proc.stdout.splitlines()
             if re.search(r"bitsandbytes|kernels|hugging ?face|warn", line, re.IGNORECASE)]
    assert not noise
