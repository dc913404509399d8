"""Training images for priors: image folders, synthetic generators, normalization, augmentation."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..io import IMAGE_SUFFIXES, read_image
from ..priors.network import NORMALIZATION_METHODS

logger = logging.getLogger(__name__)



def normalization_params(normalization: dict, image: Tensor | np.ndarray) -> dict:
    """Return ``{"offset", "scale"}`` so that ``(image - offset) / scale`` is in the prior's space.

    ``"percentile"`` maps the image's ``low`` and ``high`` percentiles to -1 and 1. The pair is
    computed per image, so brightness differences between acquisitions do not matter.
    ``"fixed"`` uses the recorded offset and scale, and ``"none"`` leaves intensities as they are.
    """
    method = normalization.get("method", "none")
    if method == "none":
        return {"offset": 0.0, "scale": 1.0}
    if method == "fixed":
        return {"offset": float(normalization["offset"]), "scale": float(normalization["scale"])}
    if method == "percentile":
        values = torch.as_tensor(image).detach().float().reshape(-1).cpu().numpy()
        low, high = np.percentile(values, [normalization["low"], normalization["high"]])
        if not high > low:
            raise ValueError(
                f"the {normalization['low']} and {normalization['high']} percentiles of the image are equal ({low:.6g}), "
                "so percentile normalization is undefined; use wider percentiles or normalization 'none'"
            )
        return {"offset": float((high + low) / 2), "scale": float((high - low) / 2)}
    raise ValueError(f"normalization method must be one of {NORMALIZATION_METHODS}; got {method!r}")


def augment(batch: Tensor, generator: torch.Generator) -> Tensor:
    """Apply a random flip and 90-degree rotation to each image of a ``(batch, C, H, W)`` square batch."""
    out = []
    flips = torch.randint(0, 2, (batch.shape[0],), generator=generator)
    turns = torch.randint(0, 4, (batch.shape[0],), generator=generator)
    for image, flip, k in zip(batch, flips.tolist(), turns.tolist()):
        image = image.flip(-1) if flip else image
        out.append(torch.rot90(image, k, dims=(-2, -1)))
    return torch.stack(out)


class ImageSource:
    """Base class: draws ``(batch, C, crop, crop)`` training batches in the prior's space."""

    channels: int = 1
    normalization: dict = {"method": "none"}

    def sample(self, batch_size: int, crop_size: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


class FolderSource(ImageSource):
    """All TIFF, FITS and PNG/JPEG images in a folder (recursively), normalized per image.

    Parameters
    ----------
    folder : path
    normalization : dict
        ``{"method": "percentile", "low": 0.1, "high": 99.9}`` by default.
    """

    def __init__(self, folder: str | os.PathLike, normalization: dict | None = None):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"training folder not found: {folder}")
        paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise ValueError(f"no images found in {folder}; allowed suffixes: {', '.join(IMAGE_SUFFIXES)}")
        self.normalization = dict(normalization or {"method": "percentile", "low": 0.1, "high": 99.9})
        self.folder = folder
        self.images: list[Tensor] = []
        for path in paths:
            data = read_image(path)
            image = torch.from_numpy(data if data.ndim == 3 else data[None])
            try:
                params = normalization_params(self.normalization, image)
            except ValueError as exc:
                raise ValueError(f"training image {path}: {exc} (--percentiles, --normalization)") from exc
            self.images.append((image - params["offset"]) / params["scale"])
        channels = {im.shape[0] for im in self.images}
        if len(channels) != 1:
            raise ValueError(f"all training images must have the same number of channels; found {sorted(channels)} in {folder}")
        self.channels = channels.pop()
        self.paths = paths
        logger.info("loaded %d training images from %s", len(paths), folder)

    def sample(self, batch_size: int, crop_size: int, generator: torch.Generator) -> Tensor:
        small = [p.name for p, im in zip(self.paths, self.images) if min(im.shape[-2:]) < crop_size]
        if small:
            raise ValueError(f"crop_size {crop_size} is larger than image(s) {small[:3]}; choose a crop_size <= the smallest image side")
        indices = torch.randint(0, len(self.images), (batch_size,), generator=generator).tolist()
        crops = []
        for i in indices:
            image = self.images[i]
            top = int(torch.randint(0, image.shape[-2] - crop_size + 1, (1,), generator=generator))
            left = int(torch.randint(0, image.shape[-1] - crop_size + 1, (1,), generator=generator))
            crops.append(image[:, top : top + crop_size, left : left + crop_size])
        return augment(torch.stack(crops), generator)

    def describe(self) -> dict:
        return {"source": "folder", "path": str(self.folder), "n_images": len(self.paths)}


# ------------------------------------------------------------------------------------------------
# Synthetic generators: functions (n, size, generator) -> (n, 1, size, size) images in [0, 1].


def _gaussian_blobs(n: int, size: int, generator: torch.Generator) -> Tensor:
    """Random isotropic Gaussian spots (1-12 per image, width 1-6 px) on a dim uneven background."""
    coords = torch.arange(size, dtype=torch.float32)
    images = torch.zeros(n, 1, size, size)
    for i in range(n):
        count = int(torch.randint(1, 13, (1,), generator=generator))
        centres = torch.rand(count, 2, generator=generator) * size
        widths = 1 + 5 * torch.rand(count, generator=generator)
        heights = 0.3 + 0.7 * torch.rand(count, generator=generator)
        dy = (coords[None, :, None] - centres[:, 0, None, None]) ** 2
        dx = (coords[None, None, :] - centres[:, 1, None, None]) ** 2
        spots = heights[:, None, None] * torch.exp(-(dx + dy) / (2 * widths[:, None, None] ** 2))
        background = 0.1 * torch.rand(1, generator=generator)
        images[i, 0] = (background + spots.sum(0)).clamp(0, 1)
    return images


def _gaussian_field(n: int, size: int, generator: torch.Generator) -> Tensor:
    """Stationary Gaussian random field with a Gaussian-shaped spectrum (correlation length ~3 px)."""
    freq = torch.fft.fftfreq(size)
    k2 = freq[:, None] ** 2 + freq[None, :] ** 2
    amplitude = torch.exp(-k2 * (2 * math.pi * 3.0) ** 2 / 4)
    noise = torch.randn(n, 1, size, size, generator=generator)
    field = torch.fft.ifft2(torch.fft.fft2(noise) * amplitude).real
    field = field / field.std(dim=(-2, -1), keepdim=True).clamp_min(1e-8)
    return (0.5 + 0.15 * field).clamp(0, 1)


def _filaments(n: int, size: int, generator: torch.Generator) -> Tensor:
    """Microtubule-like filaments at SIM resolution (see ppm_napari.filaments), percentile-normalized."""
    from ppm_napari.filaments import filament_images

    return filament_images(n, size, generator)


# A generator whose images are not in [0, 1] names the per-image normalization to apply instead.
_filaments.normalization = {"method": "percentile", "low": 0.1, "high": 99.9}

def _black_hole_rings(n: int, size: int, generator: torch.Generator) -> Tensor:
    """Rings, crescents and m-rings over 160 microarcseconds (see ppm_eht.rings)."""
    from ppm_eht.rings import ring_images

    return ring_images(n, size, generator)


SYNTHETIC_GENERATORS: dict[str, Callable[[int, int, torch.Generator], Tensor]] = {
    "blobs": _gaussian_blobs,
    "gaussian-field": _gaussian_field,
    "filaments": _filaments,
    "rings": _black_hole_rings,
}


def register_generator(name: str, function: Callable[[int, int, torch.Generator], Tensor]) -> None:
    """Make a synthetic generator available to ``ppm train-prior --synthetic NAME``."""
    SYNTHETIC_GENERATORS[name] = function


class SyntheticSource(ImageSource):
    """Images drawn on the fly from a named generator, mapped to the prior's space.

    Generators return images in [0, 1], mapped to [-1, 1], unless the function carries a
    ``normalization`` attribute (such as per-image percentiles), which is then applied to each image.
    """

    def __init__(self, name: str):
        if name not in SYNTHETIC_GENERATORS:
            raise ValueError(f"unknown synthetic generator {name!r}; available: {', '.join(sorted(SYNTHETIC_GENERATORS))}")
        self.name = name
        self.normalization = dict(getattr(SYNTHETIC_GENERATORS[name], "normalization", {"method": "fixed", "offset": 0.5, "scale": 0.5}))

    def sample(self, batch_size: int, crop_size: int, generator: torch.Generator) -> Tensor:
        images = SYNTHETIC_GENERATORS[self.name](batch_size, crop_size, generator)
        if self.normalization["method"] == "percentile":
            normalized = []
            for image in images:
                params = normalization_params(self.normalization, image)
                normalized.append((image - params["offset"]) / params["scale"])
            images = torch.stack(normalized)
        else:
            params = normalization_params(self.normalization, images)
            images = (images - params["offset"]) / params["scale"]
        return augment(images, generator)

    def describe(self) -> dict:
        doc = (SYNTHETIC_GENERATORS[self.name].__doc__ or "").strip().splitlines()
        return {"source": "synthetic", "generator": self.name, "description": doc[0] if doc else ""}


def estimate_sigma_data(source: ImageSource, crop_size: int, n: int = 256, seed: int = 0) -> float:
    """Estimate the standard deviation of normalized training crops (EDM's ``sigma_data``)."""
    generator = torch.Generator().manual_seed(seed)
    batch = source.sample(n, crop_size, generator)
    return float(batch.std())
