"""Synthetic black-hole images for training a VLBI prior: rings, crescents and m-rings.

Images are ``size x size`` over a field of view of 160 microarcseconds (2.5 uas pixels at
64 px), in [0, 1]. Parameters are drawn per image:

- diameter 20-60 uas and fractional width 0.05-0.4 of the diameter;
- brightness around the ring: ``1 + sum_k beta_k cos(k (theta - phi_k))`` with k = 1 (the
  Doppler-boosted side; amplitude 0-0.9) and k = 2 (amplitude 0-0.3), a random position angle;
- crescents: a ring minus a smaller, shifted disk (a third of the images);
- a diffuse floor (Gaussian, 0-20% of the flux) and an extra Gaussian blur of 0-10 uas;
- a random shift of the centre by up to 15 uas.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

FOV_UAS = 160.0


def ring_image(rng: np.random.Generator, size: int, fov_uas: float = FOV_UAS) -> np.ndarray:
    """Draw one ``(size, size)`` ring, crescent or m-ring image scaled to a peak of 1."""
    pixel = fov_uas / size
    coords = (np.arange(size) - (size - 1) / 2) * pixel
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    cx, cy = rng.uniform(-15, 15, 2)
    radius_grid = np.hypot(xx - cx, yy - cy)
    theta = np.arctan2(yy - cy, xx - cx)
    diameter = rng.uniform(20, 60)
    width = rng.uniform(0.05, 0.4) * diameter
    ring = np.exp(-0.5 * ((radius_grid - diameter / 2) / (width / 2.355)) ** 2)
    modulation = 1 + rng.uniform(0, 0.9) * np.cos(theta - rng.uniform(0, 2 * np.pi))
    modulation += rng.uniform(0, 0.3) * np.cos(2 * (theta - rng.uniform(0, 2 * np.pi)))
    image = ring * np.clip(modulation, 0, None)
    if rng.random() < 1 / 3:  # crescent: subtract a shifted inner disk
        shift = rng.uniform(0, 0.3) * diameter
        angle = rng.uniform(0, 2 * np.pi)
        inner = np.hypot(xx - cx - shift * np.cos(angle), yy - cy - shift * np.sin(angle)) < rng.uniform(0.3, 0.5) * diameter
        image = image * np.where(inner, rng.uniform(0, 0.3), 1.0)
    floor_width = rng.uniform(10, 40)
    floor = np.exp(-0.5 * (np.hypot(xx - cx, yy - cy) / floor_width) ** 2)
    image = image / max(image.sum(), 1e-12) + rng.uniform(0, 0.2) * floor / floor.sum()
    blur = rng.uniform(0, 10) / pixel / 2.355
    if blur > 0.1:
        image = ndimage.gaussian_filter(image, blur)
    return image / image.max()


def ring_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 1, size, size)`` images in [0, 1] (see the module docstring)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([ring_image(rng, size) for _ in range(n)])[:, None].astype(np.float32))
