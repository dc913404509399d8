"""Synthetic black-hole images for training a VLBI prior: rings, crescents and m-rings.

Images are ``size x size`` over a field of view of 160 microarcseconds (2.5 uas pixels at
64 px), in [0, 1]. Parameters are drawn per image:

- diameter 20-60 uas and fractional width 0.05-0.4 of the diameter;
- brightness around the ring: ``1 + sum_k beta_k cos(k (theta - phi_k))`` with k = 1 (the
  Doppler-boosted side; amplitude 0-0.9) and k = 2 (amplitude 0-0.3), a random position angle;
- crescents: a ring minus a smaller, shifted disk (a third of the images);
- a diffuse floor (Gaussian, 0-20% of the flux) and an extra Gaussian blur of 0-10 uas;
- a random shift of the centre by up to 15 uas;
- one image in five is instead a model image of an accretion flow (``sample_data/eht``, ehtim
  text format), rotated, flipped, rescaled by 0.6-1.4 and blurred at random.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

FOV_UAS = 160.0
MODEL_FILES = tuple(Path(__file__).resolve().parents[1] / "sample_data" / "eht" / name for name in ("avery_sgra_eofn.txt", "jason_mad_eofn.txt"))


@functools.cache
def model_images() -> tuple[tuple[np.ndarray, float], ...]:
    """Stokes I of the bundled model images with their field of view in uas (ehtim text format).

    Rows run from +x/+y (first row) as ehtim writes them; the image is square.
    """
    images = []
    for path in MODEL_FILES:
        if not path.is_file():
            continue
        table = np.loadtxt(path, comments="#", usecols=(0, 1, 2))
        side = int(round(np.sqrt(len(table))))
        if side * side != len(table):
            raise ValueError(f"{path} is not a square ehtim text image ({len(table)} pixels)")
        fov_uas = (table[:, 0].max() - table[:, 0].min()) * 1e6 * side / (side - 1)
        images.append((table[:, 2].reshape(side, side), fov_uas))
    return tuple(images)


def augmented_model_image(rng: np.random.Generator, size: int, fov_uas: float = FOV_UAS) -> np.ndarray | None:
    """Draw a randomly rotated, flipped, rescaled and blurred model image, or ``None`` if none is bundled."""
    models = model_images()
    if not models:
        return None
    image, model_fov = models[int(rng.integers(len(models)))]
    image = ndimage.rotate(image, rng.uniform(0, 360), reshape=False, order=1, mode="constant")
    if rng.random() < 0.5:
        image = image[:, ::-1]
    # Resample onto the output grid with a random magnification about the centre.
    magnification = rng.uniform(0.6, 1.4)
    side = image.shape[0]
    coords = (np.arange(size) - (size - 1) / 2) * (fov_uas / size) / (model_fov / side) / magnification + (side - 1) / 2
    grid = np.meshgrid(coords, coords, indexing="ij")
    out = ndimage.map_coordinates(image, grid, order=1, mode="constant")
    blur = rng.uniform(0, 10) / (fov_uas / size) / 2.355
    if blur > 0.1:
        out = ndimage.gaussian_filter(out, blur)
    out = np.clip(out, 0, None)
    return out / max(out.max(), 1e-30)


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
    images = []
    for _ in range(n):
        model = augmented_model_image(rng, size) if rng.random() < 0.2 else None
        images.append(model if model is not None else ring_image(rng, size))
    return torch.from_numpy(np.stack(images)[:, None].astype(np.float32))
