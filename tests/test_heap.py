"""optimize.reuse_freed_memory: glibc keeps freed blocks for the next call instead of unmapping
them. Checked in a fresh process (the setting is process-wide) by what the OS sees: memory a
large tensor used stays with the process after the tensor is freed."""

import platform
import subprocess
import sys

import pytest
from helpers import tiny_settings

from sdaccel.engine.engine import Engine
from sdaccel.events import Warning

# Resident memory (MiB) after a 256 MiB tensor was written and freed; with the setting on, first
# through the engine (`passes` printed), the freed pages stay mapped for the next allocation.
SCRIPT = """
import sys
import torch
from helpers import tiny_settings
from sdaccel.engine.engine import Engine

if sys.argv[1] == "on":
    print(Engine(tiny_settings("optimize.reuse_freed_memory=true")).passes)
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
before = resident()
tensor = torch.ones(64 * 2**20)
del tensor
print(resident() - before)
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")


def freed_but_kept_mib(mode: str, tests_dir) -> tuple[str, float]:
    run = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         check=True, cwd=tests_dir)
    *before, kept = run.stdout.strip().splitlines()
    return "".join(before), float(kept)


@glibc
def test_freed_memory_stays_with_the_process_only_when_asked(request):
    tests_dir = request.path.parent
    passes, kept = freed_but_kept_mib("on", tests_dir)
    assert passes == "['reuse_freed_memory']"
    assert kept >= 250  # all 256 MiB still mapped, ready for reuse
    assert freed_but_kept_mib("off", tests_dir)[1] < 16  # by default it goes back to the OS


def test_without_glibc_it_says_it_does_nothing(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", ""))
    warnings = []
    engine = Engine(tiny_settings("optimize.reuse_freed_memory=true"),
                    on_event=lambda e: warnings.append(e.message) if isinstance(e, Warning)
                    else None)
    assert engine.passes == []
    assert any("reuse_freed_memory has no effect here: needs glibc on Linux" in w for w in warnings)
