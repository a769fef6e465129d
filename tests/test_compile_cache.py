"""compile-cache: where entries live, what identifies them, mismatches skipped with a warning,
and (one real CPU compile) a second process that starts from the stored artifacts."""

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY, tiny_settings
from typer.testing import CliRunner

from sdaccel import compile_cache as cc
from sdaccel.cli import app
from sdaccel.engine.engine import Engine
from sdaccel.events import Warning

runner = CliRunner()
COMPILED = ["compile.enabled=true", "compile.mode=default"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDACCEL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "compile"


def fake_entry(root: Path, settings, environment: dict, artifacts: bytes = b"junk",
               key: str = "fake-32x32-b1") -> Path:
    folder = root / key
    folder.mkdir(parents=True)
    (folder / cc.ARTIFACTS).write_bytes(artifacts)
    (folder / cc.META).write_text(json.dumps({
        "key": key, "preset": "tiny", "graph_hash": cc.graph_hash(settings),
        "graph_settings": cc.graph_settings(settings), "height": 32, "width": 32, "batch": 1,
        "environment": environment, "cold_seconds": 60.0,
    }))
    return folder


def test_cache_location_follows_env_then_platform(tmp_path):
    assert cc.cache_root({"SDACCEL_CACHE_DIR": str(tmp_path)}) == tmp_path
    if sys.platform.startswith("linux"):
        assert cc.cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "sdaccel"
        assert cc.cache_root({}) == Path.home() / ".cache" / "sdaccel"


def test_graph_hash_ignores_prompt_side_settings_but_not_graph_settings():
    base = cc.graph_hash(tiny_settings(*COMPILED))
    # Seeds, steps, sampler, output folder, size (a key part of its own) change no graph.
    for same in ("seed=7", "sampler.steps=9", "sampler.name=ddim", "io.out_dir=elsewhere",
                 "generation.height=64", "compile.cache=false"):
        assert cc.graph_hash(tiny_settings(*COMPILED, same)) == base, same
    for other in ("unet_dtype=bf16", "compile.mode=max-autotune", "compile.compile_vae=true",
                  "optimize.channels_last=true", "optimize.inductor_flags=true",
                  "generation.guidance_scale=1.0", "model_id=random:sd15"):
        assert cc.graph_hash(tiny_settings(*COMPILED, other)) != base, other


def test_mismatched_damaged_and_unreadable_entries_are_reported_and_skipped(cache):
    settings = tiny_settings(*COMPILED)
    here = cc.environment("cpu")
    fake_entry(cache, settings, {**here, "torch": "1.0.0"}, key="old-torch")
    fake_entry(cache, settings, here, artifacts=b"not torch artifacts", key="damaged")
    (cache / "unreadable").mkdir()
    (cache / "unreadable" / cc.META).write_text("{not json")
    fake_entry(cache, tiny_settings(*COMPILED, "unet_dtype=bf16"), here, key="other-graph")

    events = []
    assert cc.load_matching(settings, events.append) == []
    warnings = [e.message for e in events if isinstance(e, Warning)]
    assert any(w.startswith("compile cache entry old-torch was made with torch 1.0.0 (here "
                            f"{here['torch']})") for w in warnings), warnings
    assert any("entry damaged could not be loaded" in w for w in warnings), warnings
    assert any("entry unreadable is unreadable" in w for w in warnings), warnings
    assert not any("other-graph" in w for w in warnings)  # another graph: not ours to judge
    assert len(warnings) == 3

    # Settings that do not compile, or compile without the cache, load nothing and judge nothing.
    for off in ("compile.cache=false", "compile.enabled=false"):
        events.clear()
        assert cc.load_matching(tiny_settings(*COMPILED, off), events.append) == []
        assert events == [], off


def test_device_auto_on_a_cuda_machine_records_the_gpu(cache, monkeypatch):
    """`device: auto` is resolved before the environment is read: on a CUDA machine the entry
    names the GPU, not the CPU. CUDA is only pretended here; nothing runs on it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts",
                        lambda: (b"artifacts", SimpleNamespace(fx_graph_artifacts=[1])))
    settings = tiny_settings(*COMPILED, "device=auto")
    assert cc.environment("auto")["device_name"] == "NVIDIA H200"
    assert cc.environment()["device_name"] == "NVIDIA H200"
    entry = cc.save_entry(settings, "tiny", 1, 1.0)
    assert entry.meta["environment"]["device_name"] == "NVIDIA H200"
    assert entry.meta["graph_settings"]["device"] == "cuda"
    assert entry.meta["graph_hash"] == cc.graph_hash(tiny_settings(*COMPILED, "device=cuda"))
    # ... and on that machine the entry is found and judged usable for device: auto.
    monkeypatch.setattr("sdaccel.compile_cache.load_artifacts", lambda data: None)
    events = []
    assert [e.key for e in cc.load_matching(settings, events.append)] == [entry.key]
    assert events == []


def test_a_full_disk_while_storing_an_entry_is_one_error_and_leaves_nothing(cache, monkeypatch):
    import errno

    from sdaccel.errors import OutputError

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts",
                        lambda: (b"artifacts", SimpleNamespace(fx_graph_artifacts=[1])))

    def disk_full(self, text, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    settings = tiny_settings(*COMPILED)
    with pytest.raises(OutputError, match=r"^cannot write .*: No space left on device$") as error:
        cc.save_entry(settings, "tiny", 1, 1.0)
    assert cc.entry_key(settings, 1) in str(error.value)
    assert list(cc.compile_dir().iterdir()) == []  # no staging folder left behind


def test_the_engine_never_imports_the_compile_cache():
    """The cache sits above the engine: no module of the engine imports it, even in a function."""
    engine_dir = Path(cc.__file__).parent / "engine"
    for path in engine_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n.startswith("sdaccel.compile_cache") for n in names), path.name


def test_list_and_clear(cache):
    empty = runner.invoke(app, ["compile-cache", "list"])
    assert empty.exit_code == 0 and "is empty" in empty.stderr
    settings = tiny_settings(*COMPILED)
    fake_entry(cache, settings, {**cc.environment("cpu"), "triton": "0.1"}, key="a-32x32-b1")
    fake_entry(cache, settings, cc.environment("cpu"), key="b-32x32-b1")

    listed = runner.invoke(app, ["compile-cache", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    records = {r["key"]: r for r in json.loads(listed.stdout)}
    assert records["b-32x32-b1"]["usable"] and records["b-32x32-b1"]["size_bytes"] > 0
    assert not records["a-32x32-b1"]["usable"]
    assert records["a-32x32-b1"]["mismatch"][0].startswith("triton 0.1 (here ")
    assert records["a-32x32-b1"]["model_id"] == "random:tiny"

    wrong = runner.invoke(app, ["compile-cache", "clear", "nope"])
    assert wrong.exit_code == 2 and "no entry 'nope'" in wrong.stderr
    assert "a-32x32-b1, b-32x32-b1" in wrong.stderr
    one = runner.invoke(app, ["compile-cache", "clear", "a-32x32-b1"])
    assert one.exit_code == 0 and "removed 1 entry" in one.stderr
    assert [e.key for e in cc.list_entries()] == ["b-32x32-b1"]
    assert runner.invoke(app, ["compile-cache", "clear"]).exit_code == 0
    assert cc.list_entries() == []


def test_warm_refuses_settings_that_compile_nothing_and_bad_sizes(cache):
    args = ["compile-cache", "warm", *sum((["--set", s] for s in TINY), [])]
    eager = runner.invoke(app, args)
    assert eager.exit_code == 2 and "compile.enabled=false" in eager.stderr
    bad = runner.invoke(app, [*args, "--set", "compile.enabled=true", "--size", "30x32"])
    assert bad.exit_code == 2 and "--size '30x32'" in bad.stderr
    assert not cache.exists()


SECOND_PROCESS = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {tests!r})
    from helpers import tiny_settings
    from torch._dynamo.utils import counters
    from sdaccel.compile_cache import load_matching
    from sdaccel.engine.engine import Engine
    events = []
    started = time.perf_counter()
    settings = tiny_settings(*{model!r}, "compile.enabled=true", "compile.mode=default")
    loaded = load_matching(settings, events.append)
    engine = Engine(settings, on_event=events.append)
    engine.generate(["a red circle"], seed=1)
    first = time.perf_counter() - started
    graphs = counters["stats"]["unique_graphs"]
    engine.generate(["two blue squares in the top left corner"], seed=9)
    print(json.dumps({{
        "loaded": [e.key for e in loaded], "first_seconds": first,
        "hits": counters["inductor"]["fxgraph_cache_hit"],
        "misses": counters["inductor"]["fxgraph_cache_miss"],
        "graphs": graphs, "graphs_after": counters["stats"]["unique_graphs"],
        "events": [str(e) for e in events],
    }}))
""")


SDXL_TINY = ["model_id=random:sdxl-tiny", "generation.height=64", "generation.width=64"]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "size"), [([], 32), (SDXL_TINY, 64)])
def test_warm_then_a_new_process_starts_from_the_artifacts(cache, tmp_path, model, size):
    """One real inductor compile on the CPU (about a minute), then a fresh process with an empty
    torch compile cache of its own: it must load our entry, take only cache hits, and compile
    nothing again when the prompt and seed change (SD 1.5 and SDXL)."""
    flags = sum((["--set", s] for s in [*TINY, *model, *COMPILED]), [])
    warmed = runner.invoke(app, ["compile-cache", "warm", "--json", *flags])
    assert warmed.exit_code == 0, warmed.output
    record = json.loads(warmed.stdout.strip().splitlines()[-1])
    assert record["key"].endswith(f"-{size}x{size}-b1") and record["cold_seconds"] > 0
    assert record["torch"] and record["device_name"].startswith("cpu")
    entry = cc.list_entries()[0]
    assert entry.meta["kernel_files"] > 0 and (entry.path / cc.KERNELS).is_file()

    # Same thread count as this process, which warmed the entry (the C++ kernels depend on it).
    threads = str(__import__("torch").get_num_threads())
    env = {**os.environ, "SDACCEL_CACHE_DIR": str(cache.parent), "OMP_NUM_THREADS": threads,
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "fresh-inductor"),
           "TRITON_CACHE_DIR": str(tmp_path / "fresh-triton")}
    script = SECOND_PROCESS.format(tests=str(Path(__file__).parent), model=model)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    second = json.loads(done.stdout.strip().splitlines()[-1])
    assert second["loaded"] == [record["key"]]
    assert second["hits"] >= 1 and second["misses"] == 0, second
    assert second["graphs"] >= 1 and second["graphs_after"] == second["graphs"]  # no recompile
    assert not [e for e in second["events"] if "Warning" in e], second["events"]
    # For the record (no timing asserts): cold vs warm start of the same settings.
    print(f"cold start {record['cold_seconds']:.1f} s, warm start {second['first_seconds']:.1f} s")

    # `load` finds the same entry from the same command line and reports cold beside warm.
    loaded = runner.invoke(app, ["compile-cache", "load", "--json", "--steps", "9", "--seed", "3",
                                 *flags])
    assert loaded.exit_code == 0, loaded.output
    report = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert report["key"] == record["key"] and report["loaded"] == [record["key"]]
    assert report["cold_seconds"] == round(record["cold_seconds"], 3)
    assert report["warm_seconds"] > 0 and "warm vs" in loaded.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_modes_compile_once_for_any_prompt_and_seed(mode):
    from torch._dynamo.utils import counters

    events = []
    engine = Engine(tiny_settings("device=cuda", "compile.enabled=true", f"compile.mode={mode}",
                                  "compile.cache=false"), on_event=events.append)
    engine.generate(["a red circle"], seed=1)
    graphs = counters["stats"]["unique_graphs"]
    engine.generate(["two blue squares in the top left corner"], seed=9)
    engine.generate([""], seed=12345)
    assert graphs >= 1 and counters["stats"]["unique_graphs"] == graphs
    assert not [e for e in events if isinstance(e, Warning)]  # no eager fallback either
    assert not engine.compile_fell_back
