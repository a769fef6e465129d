"""Procedural text-image data set: coloured shapes on plain or two-tone backgrounds.

Everything is deterministic from ``(seed, index)``. A scene is a small record of attributes
(:class:`Scene`); :func:`render` draws it with Pillow (4x supersampled, then downsampled, so edges
are anti-aliased) and :func:`caption` writes the sentence that states some of those attributes.

Caption grammar (every caption the data set can produce matches it)::

    caption    := "a" [size] colour shape [position] [background]
                | "two" colour shape "s" [background]
    size       := "small" | "big"                      (unstated = medium)
    position   := "in the center" | "in the top left" | "in the top right"
                | "in the bottom left" | "in the bottom right"   (unstated = anywhere)
    background := "on a" colour "background"           (plain)
                | "on a" colour "and" colour "background"  (two-tone: top half, bottom half)

Held-out split: the (shape colour, shape, background colour) triples in :data:`HELD_OUT_TRIPLES`
are never drawn in the training set (not even when the caption leaves the background unstated),
so every caption in :func:`held_out_captions` is a combination the model never saw.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
_SUPERSAMPLE = 4

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "medium", "big")
POSITIONS: tuple[str, ...] = ("center", "top left", "top right", "bottom left", "bottom right")

# Radius (in 64-pixel units) of each size class, drawn uniformly in the range.
SIZE_RADIUS: dict[str, tuple[float, float]] = {
    "small": (5.5, 7.5),
    "medium": (10.0, 12.0),
    "big": (16.0, 19.0),
}
# Nominal centre of each stated position; jittered by +-2 pixels.
POSITION_CENTRE: dict[str, tuple[float, float]] = {
    "center": (32.0, 32.0),
    "top left": (18.0, 18.0),
    "top right": (46.0, 18.0),
    "bottom left": (18.0, 46.0),
    "bottom right": (46.0, 46.0),
}

# (shape colour, shape, background colour) never drawn in training. Each colour appears twice as
# shape colour and twice as background, each shape three times.
HELD_OUT_TRIPLES: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("red", "circle", "purple"),
        ("red", "star", "green"),
        ("green", "square", "yellow"),
        ("green", "triangle", "blue"),
        ("blue", "triangle", "white"),
        ("blue", "star", "red"),
        ("yellow", "circle", "purple"),
        ("yellow", "square", "white"),
        ("purple", "square", "red"),
        ("purple", "star", "yellow"),
        ("white", "circle", "green"),
        ("white", "triangle", "blue"),
    }
)

TRAIN_SEED = 0
RING_WIDTH = 0.4  # a ring's band, as a fraction of its radius (never in the data set itself)


@dataclass(frozen=True)
class Scene:
    """What is drawn, and which attributes the caption states.

    ``background`` holds one colour (plain) or two (two-tone: top half, bottom half).
    ``position`` is ``None`` when the shape may be anywhere; ``count`` is 1 or 2 (two shapes of the
    same colour, shape and size). ``state_size``/``state_background`` say whether the caption names
    them; the position is stated exactly when it is not ``None``.
    """

    colour: str
    shape: str
    background: tuple[str, ...]
    count: int = 1
    size: str = "medium"
    position: str | None = None
    state_size: bool = False
    state_background: bool = True

    def triples(self) -> set[tuple[str, str, str]]:
        return {(self.colour, self.shape, bg) for bg in self.background}

    def is_held_out(self) -> bool:
        return bool(self.triples() & HELD_OUT_TRIPLES)


def caption(scene: Scene) -> str:
    """The caption of ``scene`` (see the module docstring for the grammar)."""
    words: list[str] = []
    if scene.count == 2:
        words += ["two", scene.colour, scene.shape + "s"]
    else:
        words.append("a")
        if scene.state_size and scene.size != "medium":
            words.append(scene.size)
        words += [scene.colour, scene.shape]
        if scene.position is not None:
            words += ["in", "the", *scene.position.split()]
    if scene.state_background:
        words += ["on", "a", " and ".join(scene.background), "background"]
    return " ".join(words)


def parse_caption(text: str) -> dict[str, object]:
    """Parse a caption of this grammar into the attributes it states.

    Returns a dict with keys ``colour``, ``shape``, ``count`` (always) and ``size``, ``position``,
    ``background`` (tuple of colours) only when stated. Raises ``ValueError`` on other text.
    """
    words = text.strip().lower().split()
    out: dict[str, object] = {}
    i = 0

    def take() -> str:
        nonlocal i
        if i >= len(words):
            raise ValueError(f"caption ends too early: {text!r}")
        i += 1
        return words[i - 1]

    first = take()
    if first not in ("a", "two"):
        raise ValueError(f"caption must start with 'a' or 'two': {text!r}")
    out["count"] = 1 if first == "a" else 2
    word = take()
    if word in ("small", "big"):
        if out["count"] == 2:
            raise ValueError(f"no size with 'two': {text!r}")
        out["size"] = word
        word = take()
    if word not in PALETTE:
        raise ValueError(f"unknown colour {word!r} in {text!r}")
    out["colour"] = word
    word = take()
    shape = word[:-1] if out["count"] == 2 and word.endswith("s") else word
    if shape not in SHAPES or (out["count"] == 2) != (word != shape):
        raise ValueError(f"unknown shape {word!r} in {text!r}")
    out["shape"] = shape
    if i < len(words) and words[i] == "in":
        i += 1
        if take() != "the":
            raise ValueError(f"expected 'in the' in {text!r}")
        first_pos = take()
        position = first_pos if first_pos == "center" else f"{first_pos} {take()}"
        if position not in POSITIONS or out["count"] == 2:
            raise ValueError(f"unknown position {position!r} in {text!r}")
        out["position"] = position
    if i < len(words):
        if take() != "on" or take() != "a":
            raise ValueError(f"expected 'on a' in {text!r}")
        bg = [take()]
        if i < len(words) and words[i] == "and":
            i += 1
            bg.append(take())
        if take() != "background" or any(c not in PALETTE for c in bg):
            raise ValueError(f"bad background in {text!r}")
        out["background"] = tuple(bg)
    if i != len(words):
        raise ValueError(f"trailing words in {text!r}")
    return out


def sample_scene(rng: random.Random, *, held_out: bool = False) -> Scene:
    """Draw a random scene; training scenes (``held_out=False``) avoid the held-out triples."""
    while True:
        scene = _draw_scene(rng)
        if scene.is_held_out() == held_out:
            return scene


def _draw_scene(rng: random.Random) -> Scene:
    colour = rng.choice(COLOURS)
    shape = rng.choice(SHAPES)
    others = [c for c in COLOURS if c != colour]
    if rng.random() < 0.15:
        background = tuple(rng.sample(others, 2))
    else:
        background = (rng.choice(others),)
    state_background = rng.random() < 0.75
    if rng.random() < 0.2:
        size = rng.choice(("small", "medium"))
        return Scene(
            colour, shape, background, count=2, size=size, state_background=state_background
        )
    size = rng.choices(SIZES, weights=(0.3, 0.4, 0.3))[0]
    position: str | None
    if size == "big":
        position = rng.choice((None, None, "center"))
    else:
        position = rng.choices((None, *POSITIONS), weights=(0.4, 0.2, 0.1, 0.1, 0.1, 0.1))[0]
    return Scene(
        colour,
        shape,
        background,
        size=size,
        position=position,
        state_size=size != "medium",
        state_background=state_background,
    )


def _jitter(
    rng: random.Random, rgb: tuple[int, int, int], amount: int = 12
) -> tuple[int, int, int]:
    r, g, b = (max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)
    return (r, g, b)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.9 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = 1.1 * r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + 0.05 * r + rad * math.sin(ang)))
        return pts
    raise ValueError(shape)


def _centres(rng: random.Random, scene: Scene, r: float) -> list[tuple[float, float]]:
    lo, hi = r + 2.0, IMAGE_SIZE - r - 2.0
    if scene.count == 1:
        if scene.position is None:
            return [(rng.uniform(lo, hi), rng.uniform(lo, hi))]
        x, y = POSITION_CENTRE[scene.position]
        x = min(hi, max(lo, x + rng.uniform(-2, 2)))
        y = min(hi, max(lo, y + rng.uniform(-2, 2)))
        return [(x, y)]
    while True:  # two shapes, far enough apart not to touch
        a = (rng.uniform(lo, hi), rng.uniform(lo, hi))
        b = (rng.uniform(lo, hi), rng.uniform(lo, hi))
        if math.dist(a, b) > 2.4 * r + 3:
            return [a, b]


def render(scene: Scene, rng: random.Random) -> Image.Image:
    """Draw ``scene`` as a 64x64 RGB image (jitter of sizes, positions, colours from ``rng``)."""
    s = _SUPERSAMPLE
    img = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s))
    draw = ImageDraw.Draw(img)
    half = IMAGE_SIZE * s // 2
    if len(scene.background) == 1:
        draw.rectangle(
            (0, 0, IMAGE_SIZE * s, IMAGE_SIZE * s), fill=_jitter(rng, PALETTE[scene.background[0]])
        )
    else:
        draw.rectangle(
            (0, 0, IMAGE_SIZE * s, half), fill=_jitter(rng, PALETTE[scene.background[0]])
        )
        draw.rectangle(
            (0, half, IMAGE_SIZE * s, IMAGE_SIZE * s),
            fill=_jitter(rng, PALETTE[scene.background[1]]),
        )
    r = rng.uniform(*SIZE_RADIUS[scene.size])
    fill = _jitter(rng, PALETTE[scene.colour])
    for cx, cy in _centres(rng, scene, r):
        if scene.shape == "circle":
            draw.ellipse(((cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s), fill=fill)
        elif scene.shape == "ring":  # not in SHAPES: what training/train_lora.py teaches
            draw.ellipse(((cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s), outline=fill,
                         width=round(RING_WIDTH * r * s))
        else:
            draw.polygon(
                [(x * s, y * s) for x, y in _shape_points(scene.shape, cx, cy, r)], fill=fill
            )
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def example(
    index: int, seed: int = TRAIN_SEED, *, held_out: bool = False
) -> tuple[Image.Image, str, Scene]:
    """The ``index``-th (image, caption, scene) of the training (or held-out) stream."""
    rng = random.Random(f"shapes/{seed}/{'heldout' if held_out else 'train'}/{index}")
    scene = sample_scene(rng, held_out=held_out)
    return render(scene, rng), caption(scene), scene


def examples(
    n: int, seed: int = TRAIN_SEED, *, held_out: bool = False, start: int = 0
) -> Iterator[tuple[Image.Image, str, Scene]]:
    for i in range(start, start + n):
        yield example(i, seed, held_out=held_out)


def held_out_scenes() -> list[Scene]:
    """The evaluation scenes: for each held-out triple, three captions.

    ``"a C S on a B background"``, a sized+placed variant and a two-shape variant.
    """
    corners = ("top left", "top right", "bottom left", "bottom right")
    out: list[Scene] = []
    for k, (colour, shape, bg) in enumerate(sorted(HELD_OUT_TRIPLES)):
        out.append(Scene(colour, shape, (bg,)))
        size = "small" if k % 2 == 0 else "big"
        position = corners[k % 4] if size == "small" else "center"
        out.append(Scene(colour, shape, (bg,), size=size, position=position, state_size=True))
        out.append(Scene(colour, shape, (bg,), count=2, size="medium"))
    return out


def held_out_captions() -> list[str]:
    return [caption(s) for s in held_out_scenes()]


def vocabulary() -> list[str]:
    """Every word the grammar can produce."""
    words = {"a", "two", "small", "big", "in", "the", "on", "and", "background"}
    words |= set(COLOURS) | set(SHAPES) | {s + "s" for s in SHAPES}
    for p in POSITIONS:
        words |= set(p.split())
    return sorted(words)


def all_caption_forms() -> Iterator[str]:
    """Every caption the grammar can produce (used to check the tokenizer round trip)."""
    for colour in COLOURS:
        others = [c for c in COLOURS if c != colour]
        bgs: list[tuple[str, ...]] = [()] + [(b,) for b in others]
        bgs += [(b1, b2) for b1 in others for b2 in others if b1 != b2]
        for shape in SHAPES:
            for bg in bgs:
                state_bg = bool(bg)
                background = bg or (others[0],)
                yield caption(Scene(colour, shape, background, count=2, state_background=state_bg))
                for size in SIZES:
                    for position in (None, *POSITIONS):
                        yield caption(
                            Scene(
                                colour,
                                shape,
                                background,
                                size=size,
                                position=position,
                                state_size=True,
                                state_background=state_bg,
                            )
                        )
