"""Alignment judge for the shapes data set: read an image back into attributes, score a caption.

A transparent rule, no learnt weights:

1. every pixel takes the nearest palette colour (:data:`dataset.PALETTE`);
2. background: the majority colour of the image border, per half (top, bottom); two different
   halves, each a clear majority, make a two-tone background;
3. shape colour: the most frequent non-background colour among pixels close to a palette colour
   (at least :data:`MIN_SHAPE_PIXELS` of them, else "no shape");
4. count: connected regions of that colour at least 30% as large as the largest;
5. shape: nearest prototype in (extent = area / bounding-box area, solidity = area / convex-hull
   area) of the largest region; prototypes are the data set's means (square 1.0/1.0, circle
   0.79/0.97, triangle 0.54/0.93, star 0.40/0.58);
6. size: the largest region's longest bounding-box side (< 17 px small, > 27 px big, for 64 px);
7. position: the centre of the region's bounding box, in thirds of the image (the middle third
   on both axes is "center").

:func:`score` checks only what a caption states (see :func:`dataset.parse_caption`); an image is
*aligned* when every stated attribute is right.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from sdaccel.shapes import dataset

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "background", "count", "size", "position")
MIN_SHAPE_PIXELS = 8
MAX_COLOUR_DISTANCE = 90.0  # RGB distance beyond which a pixel is "no palette colour"
SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "square": (1.00, 1.00),
    "circle": (0.79, 0.97),
    "triangle": (0.54, 0.93),
    "star": (0.40, 0.58),
}

_NAMES = list(dataset.PALETTE)
_PALETTE = np.array([dataset.PALETTE[n] for n in _NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Reading:
    """What the judge sees in an image; ``None`` where it sees no shape."""

    background: tuple[str, ...]
    colour: str | None
    shape: str | None
    count: int
    size: str | None
    position: str | None


@dataclass(frozen=True)
class Score:
    caption: str
    reading: Reading
    correct: dict[str, bool] = field(default_factory=dict)  # stated attributes only

    @property
    def aligned(self) -> bool:
        return all(self.correct.values())


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    else:
        arr = np.asarray(image, dtype=np.float32)
        if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
            arr = arr.transpose(1, 2, 0)
        if arr.max() <= 1.0:
            arr = arr * 255.0
    if arr.shape[:2] != (dataset.IMAGE_SIZE, dataset.IMAGE_SIZE):
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        arr = np.asarray(
            img.resize((dataset.IMAGE_SIZE,) * 2, Image.Resampling.BOX), dtype=np.float32
        )
    return arr


def _majority(labels: np.ndarray) -> tuple[int, float]:
    counts = np.bincount(labels.ravel(), minlength=len(_NAMES))
    k = int(counts.argmax())
    return k, float(counts[k] / max(1, counts.sum()))


def read(image: Image.Image | np.ndarray) -> Reading:
    """Read background, colour, shape, count, size and position from a 64x64 (or resized) image."""
    from skimage.measure import label, regionprops

    arr = _as_array(image)
    n = arr.shape[0]
    dist = np.linalg.norm(arr[:, :, None, :] - _PALETTE[None, None], axis=-1)
    lab = dist.argmin(-1)
    near = dist.min(-1) < MAX_COLOUR_DISTANCE

    border = np.zeros((n, n), dtype=bool)
    border[:2, :] = border[-2:, :] = border[:, :2] = border[:, -2:] = True
    top, bottom = border.copy(), border.copy()
    top[n // 2 :, :] = False
    bottom[: n // 2, :] = False
    kt, ft = _majority(lab[top])
    kb, fb = _majority(lab[bottom])
    if kt != kb and ft > 0.6 and fb > 0.6:
        bg = (kt, kb)
    else:
        bg = (_majority(lab[border])[0],)
    background = tuple(_NAMES[k] for k in bg)

    fg = near & ~np.isin(lab, bg)
    counts = Counter(lab[fg].tolist())
    if not counts or counts.most_common(1)[0][1] < MIN_SHAPE_PIXELS:
        return Reading(background, None, None, 0, None, None)
    k = counts.most_common(1)[0][0]
    regions = sorted(regionprops(label(fg & (lab == k), connectivity=2)), key=lambda r: -r.area)
    big = regions[0]
    count = sum(1 for r in regions if r.area >= max(MIN_SHAPE_PIXELS / 2, 0.3 * big.area))
    feat = np.array([big.extent, big.solidity])
    shape = min(
        SHAPE_PROTOTYPES, key=lambda s: float(np.sum((feat - np.array(SHAPE_PROTOTYPES[s])) ** 2))
    )
    side = max(big.bbox[2] - big.bbox[0], big.bbox[3] - big.bbox[1]) * 64 / n
    size = "small" if side < 17 else "big" if side > 27 else "medium"
    y0, x0, y1, x1 = big.bbox
    cy, cx = (y0 + y1) / 2 / n, (x0 + x1) / 2 / n
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "middle"
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    # an edge ("top middle") is no grammar position, so it never matches a stated one
    position = "center" if col == row == "middle" else f"{row} {col}"
    return Reading(background, _NAMES[k], shape, count, size, position)


def score(image: Image.Image | np.ndarray, caption: str) -> Score:
    """Check every attribute ``caption`` states against what :func:`read` sees."""
    want = dataset.parse_caption(caption)
    got = read(image)
    correct = {
        "colour": got.colour == want["colour"],
        "shape": got.shape == want["shape"],
        "count": got.count == want["count"],
    }
    if "background" in want:
        correct["background"] = got.background == want["background"]
    if "size" in want:
        correct["size"] = got.size == want["size"]
    if "position" in want:
        correct["position"] = got.position == want["position"]
    return Score(caption, got, correct)


def accuracy(
    images: Iterable[Image.Image | np.ndarray], captions: Sequence[str]
) -> dict[str, float]:
    """Per-attribute accuracy (over captions stating it) and ``aligned`` (all stated correct)."""
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    n = 0
    for image, text in zip(images, captions, strict=True):
        s = score(image, text)
        for attr, ok in s.correct.items():
            total[attr] += 1
            right[attr] += int(ok)
        right["aligned"] += int(s.aligned)
        n += 1
    out = {a: right[a] / total[a] for a in ATTRIBUTES if total[a]}
    out["aligned"] = right["aligned"] / max(1, n)
    out["n"] = float(n)
    return out


def has_hole(image: Image.Image | np.ndarray) -> bool | None:
    """Whether the largest shape :func:`read` finds has a hole showing the background, at least
    :data:`MIN_SHAPE_PIXELS` large (a ring, which no data-set shape has; a blob of another colour
    inside a shape is no hole); ``None``: no shape."""
    from skimage.measure import label, regionprops

    reading = read(image)
    if reading.colour is None:
        return None
    arr = _as_array(image)
    colour = np.array(dataset.PALETTE[reading.colour], dtype=np.float32)
    mask = np.linalg.norm(arr - colour, axis=-1) < MAX_COLOUR_DISTANCE
    big = max(regionprops(label(mask, connectivity=2)), key=lambda r: r.area)
    y0, x0, y1, x1 = big.bbox
    hole = arr[y0:y1, x0:x1][big.image_filled & ~big.image]
    if len(hole) < MIN_SHAPE_PIXELS:
        return False
    backgrounds = np.array([dataset.PALETTE[c] for c in reading.background], dtype=np.float32)
    near = np.linalg.norm(hole[:, None] - backgrounds[None], axis=-1).min(-1) < MAX_COLOUR_DISTANCE
    return bool(near.sum() >= MIN_SHAPE_PIXELS)
