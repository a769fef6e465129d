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


class UNetWatch:
    """A UNet wrapper (Engine(settings, unet_wrappers=[watch])) recording every UNet call the
    engine makes, feature caching's full and shallow ones included, as UNetCall(rows, timestep,
    dtype) in `calls`."""

    def __init__(self) -> None:
        self.calls: list[UNetCall] = []

    def __call__(self, call):
        def counted(unet_input):
            sample = unet_input.sample
            self.calls.append(UNetCall(sample.shape[0], float(unet_input.timestep), sample.dtype))
            return call(unet_input)
        return counted


@pytest.fixture
def unet_calls() -> UNetWatch:
    return UNetWatch()
