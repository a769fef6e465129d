import os

# Tests never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402

from sdaccel.settings import resolve_settings  # noqa: E402

TINY = ["model_id=random:tiny", "generation.height=32", "generation.width=32",
        "sampler.steps=4", "device=cpu"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """A developer's own SDACCEL_* variables must not change what tests see."""
    for var in list(os.environ):
        if var.startswith("SDACCEL_"):
            monkeypatch.delenv(var)


def tiny_settings(*overrides: str, preset: str = "tiny"):
    """Settings for the random tiny model at 32x32, 4 steps, plus `overrides`."""
    return resolve_settings(preset, overrides=[*TINY, *overrides], environ={}).settings
