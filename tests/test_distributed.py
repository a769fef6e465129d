"""Prompts-file runs across processes, as users launch them: `torchrun` with 2 CPU processes
(gloo) gives the files and manifest of a single-process run; a run killed with SIGKILL and
started again finishes the list without redoing or losing an image."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import TINY_FLAGS
from PIL import Image

from sdaccel.jobs import MANIFEST, read_manifest

BIN = os.path.dirname(sys.executable)
SDACCEL = shutil.which("sdaccel", path=BIN)
TORCHRUN = shutil.which("torchrun", path=BIN)

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _scripts():
    """These tests are what users launch: without the console scripts they fail, not skip."""
    assert SDACCEL and TORCHRUN, (
        f"the sdaccel and torchrun console scripts must be installed in {BIN} "
        "(pip install -e '.[test]')")


def sdaccel(prompts_file, out, processes=1, **popen):
    launcher = [TORCHRUN, "--standalone", "--nnodes", "1", "--nproc-per-node", str(processes),
                "--no-python"] if processes > 1 else []
    command = [*launcher, SDACCEL, "generate", "--prompts-file", str(prompts_file),
               *TINY_FLAGS, "--out-dir", str(out), "--json"]
    # This test's environment (its private cache folder), one thread per process.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(command, env=env, **popen)
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def without_timing(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image)


def test_two_processes_make_what_one_makes(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("a red circle\n"
                       '{"prompt": "a blue square", "seed": 1000, "negative_prompt": "blurry"}\n'
                       '{"prompt": "a green triangle", "height": 40}\n'
                       "a yellow star\n"
                       "a purple moon\n")
    single = sdaccel(prompts, tmp_path / "one")
    double = sdaccel(prompts, tmp_path / "two", processes=2)

    one, two = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert [r["index"] for r in one] == [0, 1, 2, 3, 4]
    assert without_timing(two) == without_timing(one)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names  # no rank files left
    for record in one:  # batch size 1: pixel-identical
        assert np.array_equal(pixels(tmp_path / "one" / record["file"]),
                              pixels(tmp_path / "two" / record["file"]))
    # Only the main process draws progress and prints records: each image once, all ranks'.
    assert double.stderr.count("saved ") == 5
    assert sorted(json.loads(line)["index"] for line in double.stdout.splitlines()) == [
        0, 1, 2, 3, 4]
    assert "2 process(es)" in double.stderr and "1 process(es)" in single.stderr


def test_killed_run_resumes_without_redoing_or_losing(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"shape number {k}\n" for k in range(16)))
    out = tmp_path / "out"
    proc = sdaccel(prompts, out, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = out / "manifest.rank0.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if part.is_file() and part.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in out.glob("img_*.png")}
    assert 3 <= len(before) < 16

    resumed = sdaccel(prompts, out, processes=2)  # another world size: same jobs, same names
    made = sorted(json.loads(line)["index"] for line in resumed.stdout.splitlines())
    manifest = read_manifest(out)
    assert [r["index"] for r in manifest] == list(range(16))  # every job, exactly once
    recorded = {r["file"] for r in manifest}
    assert {f"img_{r['index']:03d}_steps2.png" for r in manifest} == recorded
    assert set(before) <= recorded
    assert not set(made) & {int(name[4:7]) for name in before}  # nothing redone
    assert len(made) + len(before) == 16
    after = {p.name: (p.stat().st_ino, p.read_bytes()) for p in out.glob("img_*.png")}
    assert {name: after[name] for name in before} == before  # untouched: same inode, bytes
    assert sorted(p.name for p in out.iterdir()) == sorted([*recorded, MANIFEST])  # no leftovers
