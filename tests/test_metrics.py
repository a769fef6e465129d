"""psnr/ssim sanity and alignment scoring through sdaccel.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from sdaccel import metrics
from sdaccel.shapes import dataset


def _noisy(img: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    arr = np.asarray(img).astype(np.float64)
    arr += np.random.default_rng(seed).normal(0, sigma, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def test_identical_images_are_perfect():
    img, _, _ = dataset.example(0)
    assert math.isinf(metrics.psnr(img, img))
    assert metrics.ssim(img, img) == pytest.approx(1.0, abs=1e-4)


def test_more_noise_scores_lower():
    img, _, _ = dataset.example(1)
    light, heavy = _noisy(img, 5), _noisy(img, 40)
    assert math.isfinite(metrics.psnr(light, img))
    assert metrics.psnr(light, img) > metrics.psnr(heavy, img) > 0
    assert 1.0 > metrics.ssim(light, img) > metrics.ssim(heavy, img)


def test_known_psnr_value():
    a = np.zeros((8, 8, 3), dtype=np.uint8)
    b = np.full((8, 8, 3), 255 // 10, dtype=np.uint8)  # PSNR = 20 log10(255 / 25)
    assert metrics.psnr(b, a) == pytest.approx(20 * math.log10(255 / 25), abs=1e-3)


def test_accepts_pil_arrays_and_tensors_alike():
    img, _, _ = dataset.example(2)
    ref = _noisy(img, 10)
    value = metrics.psnr(img, ref)
    chw = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    assert metrics.psnr(chw, ref) == pytest.approx(value, abs=1e-3)
    assert metrics.psnr(np.asarray(img), np.asarray(ref)) == pytest.approx(value, abs=1e-3)
    assert metrics.psnr([img, img], [ref, ref]) == pytest.approx(value, abs=1e-3)
    assert metrics.ssim(chw[None], ref) == pytest.approx(metrics.ssim(img, ref), abs=1e-4)
    with pytest.raises(ValueError):
        metrics.psnr(img, img.resize((32, 32)))


def test_alignment_delegates_to_the_judge():
    items = list(dataset.examples(30, seed=21))
    images, captions = [i for i, _, _ in items], [c for _, c, _ in items]
    result = metrics.alignment(images, captions)
    assert result["aligned"] == 1.0 and result["n"] == 30
    assert {"colour", "shape", "count"} <= set(result)
    assert metrics.is_aligned(images[0], captions[0])
    shuffled = metrics.alignment(images, captions[1:] + captions[:1])
    assert shuffled["aligned"] < 0.3
