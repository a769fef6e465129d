"""torch.compile in the engine: only a failed compile falls back to eager, visibly; a runtime
error after it propagates; a real compile gives the eager image and compiles once for any prompt
and seed."""

import pytest
import torch
from helpers import tiny_settings

from sdaccel.engine.engine import Engine
from sdaccel.engine.speed.compile import compile_callable
from sdaccel.events import Warning
from sdaccel.settings import CompileSettings


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    from torch._inductor.exc import CppCompileError

    def broken_compile(fn, **_options):
        def fails(*_args, **_kwargs):
            raise CppCompileError(["g++", "kernel.cpp"], "inductor exploded")
        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    events = []
    engine = Engine(tiny_settings("compile.enabled=true", "compile.compile_vae=true"),
                    on_event=events.append)
    assert not engine.compile_fell_back and engine.compile_fallbacks == ()
    result = engine.generate(["a red circle"])[0]
    assert engine.compile_fell_back and engine.compile_fallbacks == ("UNet", "VAE decode")
    warnings = [e.message for e in events if isinstance(e, Warning)]
    assert warnings == [
        "torch.compile of the UNet failed (CppCompileError: C++ compile error); running it "
        "eagerly",
        "torch.compile of the VAE decode failed (CppCompileError: C++ compile error); running it"
        " eagerly"]
    assert torch.equal(result.latents, Engine(tiny_settings()).generate(["a red circle"])[0]
                       .latents)


@pytest.mark.parametrize("failing_call", [1, 2])
def test_a_runtime_error_of_the_compiled_code_propagates(monkeypatch, failing_call):
    """On the first call (which compiles, then runs) as on a later one: not a failed compile."""
    def flaky_compile(fn, **_options):
        calls = []

        def compiled(*args, **kwargs):
            calls.append(1)
            if len(calls) == failing_call:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return fn(*args, **kwargs)
        return compiled

    monkeypatch.setattr(torch, "compile", flaky_compile)
    events = []
    engine = Engine(tiny_settings("compile.enabled=true"), on_event=events.append)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.generate(["a red circle"])
    assert not engine.compile_fell_back
    assert not [e for e in events if isinstance(e, Warning)]


def test_a_failed_recompile_on_a_later_call_falls_back(monkeypatch):
    """A later call that compiles again (a new shape) and fails there is still a compile."""
    from torch._dynamo.exc import BackendCompilerFailed

    def recompile_fails(fn, **_options):
        def compiled(x):
            if x.shape[0] > 1:
                raise BackendCompilerFailed(fn, RuntimeError("C++ compile error"), None)
            return fn(x)
        return compiled

    monkeypatch.setattr(torch, "compile", recompile_fails)
    events = []
    call = compile_callable(lambda x: x + 1, CompileSettings(mode="default"), "UNet",
                            events.append)
    assert call(torch.zeros(1)).tolist() == [1.0]
    assert call(torch.zeros(2)).tolist() == [1.0, 1.0] and call.fell_back
    assert len(events) == 1 and "C++ compile error" in events[0].message
    assert call(torch.zeros(1)).tolist() == [1.0]  # eager from then on


def test_out_of_memory_while_compiling_propagates(monkeypatch):
    def out_of_memory(fn, **_options):
        def compiled(*_args):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return compiled

    monkeypatch.setattr(torch, "compile", out_of_memory)
    events = []
    call = compile_callable(lambda x: x, CompileSettings(mode="default"), "UNet", events.append)
    with pytest.raises(torch.OutOfMemoryError):
        call(torch.zeros(1))
    assert not call.fell_back and events == []


@pytest.mark.slow
@pytest.mark.parametrize("model", ["random:tiny", "random:sdxl-tiny"])
def test_compiled_unet_matches_eager(model):
    """A real inductor compile on the CPU (about a minute): same image as eager, within float
    reassociation, and a second prompt and seed reuse the compiled graph (no recompile); SDXL's
    added conditioning goes through the compiled UNet the same way."""
    counters = torch._dynamo.utils.counters  # dynamo's own: graphs compiled in this process
    events = []
    compiled = Engine(tiny_settings(f"model_id={model}", "compile.enabled=true",
                                    "compile.mode=default"), on_event=events.append)
    before = counters["stats"]["unique_graphs"]
    first = compiled.generate(["a red circle"])[0]
    graphs = counters["stats"]["unique_graphs"]
    compiled.generate(["a blue square"], seed=5)
    assert graphs > before  # the first call compiled the UNet ...
    assert counters["stats"]["unique_graphs"] == graphs  # ... and the second compiled nothing
    assert not compiled.compile_fell_back
    assert not [e for e in events if isinstance(e, Warning)]  # it compiled; no fallback
    eager = Engine(tiny_settings(f"model_id={model}")).generate(["a red circle"])[0]
    assert torch.allclose(first.latents, eager.latents, rtol=1e-3, atol=1e-3)


def test_freezing_and_inductor_flags_travel_as_inductor_options_with_the_mode():
    from sdaccel.engine.speed.compile import compile_options
    from sdaccel.engine.speed.optimize import INDUCTOR_FLAGS
    from sdaccel.settings import CompileSettings

    assert compile_options(CompileSettings(mode="default"), False)["mode"] == "default"
    frozen = compile_options(CompileSettings(mode="max-autotune", freezing=True), False)
    assert "mode" not in frozen and frozen["options"]["freezing"] is True
    assert frozen["options"]["max_autotune"] is True  # the mode's own options kept
    both = compile_options(CompileSettings(mode="default", freezing=True), True)["options"]
    assert both["freezing"] is True and all(both[k] == v for k, v in INDUCTOR_FLAGS.items())

