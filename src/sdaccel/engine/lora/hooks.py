"""What must follow a LoRA switch that rewrote weights in place, registered by whoever knows.

A speed pass that builds weights of its own out of a model's weights (optimize.fuse_qkv
concatenates to_q, to_k and to_v into one to_qkv) registers a hook on the model it rewrote;
LoraSwitcher calls the model's hooks with the names of the modules whose weight it changed,
after every switch and after the reset that follows a failed one. So the LoRA code knows no
pass, and a new pass that keeps derived weights adds its hook beside itself.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any
from weakref import WeakKeyDictionary

# hook(model, names): `names` are module names inside `model` ("down_blocks.1....to_q")
WeightsHook = Callable[[Any, Collection[str]], None]

# Keyed weakly: a model that is dropped takes its hooks with it.
_HOOKS: WeakKeyDictionary[Any, list[WeightsHook]] = WeakKeyDictionary()


def on_weights_changed(model: Any, hook: WeightsHook) -> None:
    """Call `hook(model, names)` whenever a LoRA switch rewrites weights of `model` in place
    (registering the same hook twice calls it once)."""
    hooks = _HOOKS.setdefault(model, [])
    if hook not in hooks:
        hooks.append(hook)


def weights_changed(model: Any, names: Collection[str]) -> None:
    """Tell `model`'s hooks that the weights of the modules `names` were rewritten in place."""
    if names:
        for hook in _HOOKS.get(model, ()):
            hook(model, names)
