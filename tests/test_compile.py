"""torch.compile in the engine: a failed compile falls back to eager visibly, and a real
compile gives the eager image and compiles once for any prompt and seed."""

import pytest
import torch
from helpers import tiny_settings

from sdaccel.engine.engine import Engine
from sdaccel.events import Warning


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken_compile(fn, **_options):
        def fails(*_args, **_kwargs):
            raise RuntimeError("inductor exploded")
        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    events = []
    compiled = Engine(tiny_settings("compile.enabled=true", "compile.compile_vae=true"),
                      on_event=events.append)
    eager = Engine(tiny_settings())
    result = compiled.generate(["a red circle"])[0]
    warnings = [e.message for e in events if isinstance(e, Warning)]
    assert any("UNet failed (RuntimeError: inductor exploded); running it eagerly" in w
               for w in warnings)
    assert any("VAE decode failed" in w for w in warnings)
    assert torch.equal(result.latents, eager.generate(["a red circle"])[0].latents)


@pytest.mark.slow
def test_compiled_unet_matches_eager():
    """A real inductor compile on the CPU (about a minute): same image as eager, within float
    reassociation, and a second prompt and seed reuse the compiled graph (no recompile)."""
    counters = torch._dynamo.utils.counters  # dynamo's own: graphs compiled in this process
    events = []
    compiled = Engine(tiny_settings("compile.enabled=true", "compile.mode=default"),
                      on_event=events.append)
    before = counters["stats"]["unique_graphs"]
    first = compiled.generate(["a red circle"])[0]
    graphs = counters["stats"]["unique_graphs"]
    compiled.generate(["a blue square"], seed=5)
    assert graphs > before  # the first call compiled the UNet ...
    assert counters["stats"]["unique_graphs"] == graphs  # ... and the second compiled nothing
    assert not compiled.compile_fell_back
    assert not [e for e in events if isinstance(e, Warning)]  # it compiled; no fallback
    eager = Engine(tiny_settings()).generate(["a red circle"])[0]
    assert torch.allclose(first.latents, eager.latents, rtol=1e-3, atol=1e-3)
