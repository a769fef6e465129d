"""Fixtures every test gets (offline, clean environment, private cache, seeded RNGs) and the
UNet-call counter. Shared values and functions are in helpers.py."""

import os
import random
import sys
from typing import NamedTuple

# Tests never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path_factory):
    """A developer's own SDACCEL_* variables must not change what tests see, and no test reads
    or writes the real cache (~/.cache/sdaccel): SDACCEL_CACHE_DIR, which decides the cache
    folder before XDG_CACHE_HOME and the platform default, points at a fresh folder. Child
    processes inherit it."""
    for var in list(os.environ):
        if var.startswith("SDACCEL_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("SDACCEL_CACHE_DIR", str(tmp_path_factory.mktemp("sdaccel-cache")))


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global random state (torch, random, numpy)."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def _no_compiled_graphs_left_behind():
    """What one test compiled must not serve the next: dynamo reuses a compiled UNet forward for
    any UNet of the same shape in the process, so a later cold compile would compile nothing."""
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


class UNetCall(NamedTuple):
    rows: int  # images in the call's batch (guided: both halves)
    timestep: float
    dtype: torch.dtype  # of the sample the UNet was given


@pytest.fixture
def unet_calls():
    """`calls = unet_calls(engine)` records every UNet call `engine` makes from then on: full
    calls and feature caching's full and shallow ones, as UNetCall(rows, timestep, dtype)."""

    def watch(engine) -> list[UNetCall]:
        calls: list[UNetCall] = []

        def counted(fn):
            def call(x, t, *args, **kwargs):
                calls.append(UNetCall(x.shape[0], float(t), x.dtype))
                return fn(x, t, *args, **kwargs)
            return call

        engine._unet_forward = counted(engine._unet_forward)
        if engine.layered is not None:
            engine.layered.full = counted(engine.layered.full)
            engine.layered.shallow = counted(engine.layered.shallow)
        return calls

    return watch
