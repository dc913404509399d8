"""Small figure helpers shared by the command line and the benchmarks."""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor


def display_range(images: np.ndarray, normalization: dict | None = None) -> np.ndarray:
    """Map images to [0, 1] for display.

    Images in a normalized prior space ([-1, 1] by construction) map linearly; anything else
    uses the 0.5 and 99.5 percentiles of all images together.
    """
    if normalization and normalization.get("method") in ("percentile", "fixed"):
        return np.clip((images + 1) / 2, 0, 1)
    low, high = np.percentile(images, [0.5, 99.5])
    return np.clip((images - low) / max(high - low, 1e-12), 0, 1)


def image_grid(samples: Tensor | np.ndarray, normalization: dict | None = None, columns: int | None = None, gap: int = 2) -> np.ndarray:
    """Tile ``(n, C, H, W)`` samples (first channel) into one ``(rows*H, columns*W)`` image in [0, 1]."""
    images = np.asarray(samples.detach().cpu() if isinstance(samples, Tensor) else samples)[:, 0]
    n, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    images = display_range(images, normalization)
    grid = np.ones((rows * (height + gap) - gap, columns * (width + gap) - gap))
    for index, image in enumerate(images):
        r, c = divmod(index, columns)
        grid[r * (height + gap) : r * (height + gap) + height, c * (width + gap) : c * (width + gap) + width] = image
    return grid
