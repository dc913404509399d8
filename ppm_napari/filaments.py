"""Synthetic filament images at SIM resolution, for training a microtubule prior.

Each image contains smooth random curves drawn as chains of fluorophores. Parameters are in pixels of
the super-resolved grid (about 30 nm for 2x SIM of a 60 nm camera pixel):

- curves: persistent random walks whose curvature itself drifts, so some run nearly straight
  and others bend over a few micrometres; they cross freely;
- bundles: a third of the curves get a partner running alongside at 1.5-4 px, for part of
  their length;
- labelling: each curve has its own brightness (a factor of 3 between curves) and a slow
  brightness drift along it, and fluorophore density fluctuates, giving the beaded look of
  immunostained microtubules;
- width: the line profile is a Gaussian with standard deviation 0.9-1.6 px (FWHM 60-115 nm),
  the resolution of a SIM reconstruction;
- background: an offset plus a blurred copy of the filaments (out-of-focus light) and a smooth
  random field, then weak noise.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage


def _curve(rng: np.random.Generator, size: int, step: float = 0.5) -> np.ndarray:
    """Points ``(k, 2)`` of one persistent random curve crossing a ``size``-pixel square."""
    margin = 0.25 * size
    start = rng.uniform(-margin, size + margin, 2)
    heading = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.6, 2.0) * size
    n = max(int(length / step), 2)
    # Curvature (rad/px) = a constant bend plus smooth fluctuations with a correlation length of
    # about 30 px; radii of curvature are mostly above 50 px (1.5 um), as in interphase cells.
    wiggle = ndimage.gaussian_filter1d(rng.normal(0, 1, n), 60 / step, mode="nearest")
    wiggle /= wiggle.std() + 1e-12
    curvature = rng.normal(0, 0.004) + rng.uniform(0.0, 0.012) * wiggle
    angles = heading + np.cumsum(curvature * step)
    return start + step * np.cumsum(np.stack([np.cos(angles), np.sin(angles)], 1), 0)


def _splat(canvas: np.ndarray, points: np.ndarray, weights: np.ndarray) -> None:
    """Add ``weights`` at sub-pixel ``points`` (row, col) with bilinear interpolation."""
    size = canvas.shape[0]
    base = np.floor(points).astype(np.int64)
    frac = points - base
    for dy in (0, 1):
        for dx in (0, 1):
            rows = base[:, 0] + dy
            cols = base[:, 1] + dx
            w = weights * np.where(dy, frac[:, 0], 1 - frac[:, 0]) * np.where(dx, frac[:, 1], 1 - frac[:, 1])
            inside = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
            np.add.at(canvas, (rows[inside], cols[inside]), w[inside])


def filament_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw one ``(size, size)`` filament image with values in about [0, 1]."""
    canvas = np.zeros((size, size))
    count = int(rng.integers(4, 8 + int(40 * (size / 128) ** 2)))
    for _ in range(count):
        points = _curve(rng, size)
        n = len(points)
        drift = 1 + 0.35 * ndimage.gaussian_filter1d(rng.normal(0, 1, n), 40, mode="nearest") * 6
        weights = rng.uniform(0.33, 1.0) * np.clip(drift, 0.2, None) * rng.gamma(4.0, 0.25, n)
        _splat(canvas, points, weights)
        if rng.random() < 0.33:  # a bundled partner along part of the curve
            tangent = np.gradient(points, axis=0)
            normal = np.stack([-tangent[:, 1], tangent[:, 0]], 1)
            normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-12
            lo, hi = sorted(rng.integers(0, n, 2))
            part = slice(lo, max(hi, lo + 2))
            offset = rng.uniform(1.5, 4.0) * rng.choice([-1, 1])
            _splat(canvas, points[part] + offset * normal[part], weights[part] * rng.uniform(0.5, 1.0))
    width = rng.uniform(0.9, 1.6)
    filaments = ndimage.gaussian_filter(canvas, width, mode="constant") * (2 * np.pi * width**2) * 0.5
    haze = ndimage.gaussian_filter(filaments, rng.uniform(6, 12), mode="reflect")
    field = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), size / 4, mode="wrap")
    field = field / (field.std() + 1e-12)
    background = rng.uniform(0.02, 0.15) * (1 + 0.3 * field).clip(0.2) + rng.uniform(0.5, 3.0) * haze
    image = filaments + background
    image = image + rng.uniform(0.0, 0.02) * rng.normal(0, 1, image.shape) * np.sqrt(image.clip(0) + 0.05)
    return image


def filament_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 1, size, size)`` filament images (see the module docstring), unnormalized."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([filament_image(rng, size) for _ in range(n)])[:, None].astype(np.float32))
