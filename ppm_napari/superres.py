"""Widefield -> SIM-like super-resolution with posterior samples: the Qt-free core.

:func:`super_resolve` takes a widefield image in camera units and returns posterior samples of
the fine-grid image in the same units, with their mean and per-pixel standard deviation. The
napari widget and ``ppm micro reconstruct`` both call it.

Intensity units. The prior lives in a normalized space (for the shipped filament prior, the
image's 0.1 and 99.9 percentiles map to -1 and 1). The fine image is unknown, so its
percentiles are taken from a Richardson-Lucy estimate, because deconvolution recovers the
contrast that the blur removed. The widefield's own percentiles would put filaments 2-3x
brighter than anything the prior has seen. The operator is linear and keeps constants (the PSF
sums to 1 and the camera averages), so the same affine map applies to the measurement, and
the noise model is rescaled with it.

Large images are cut into overlapping tiles (``tile_size``, in camera pixels), reconstructed
one after another and blended with linear ramps across the overlaps. Peak memory then depends
on the tile size, not the image size.
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ppm_core.inference.api import METHODS as RECONSTRUCT_METHODS
from ppm_core.inference.api import reconstruct
from ppm_core.operators import SignalDependentNoise
from ppm_core.priors.base import Prior

from .noise import estimate_noise
from .operator import SuperResolution

logger = logging.getLogger(__name__)

DETERMINISTIC_METHODS = ("richardson-lucy", "bicubic")
METHODS = ("ppm", "red-diff", "dps", "rlsd", "ikl", "ppm-sim") + DETERMINISTIC_METHODS

# Settings tuned on CPU for 256x256 fine images (see docs/benchmarks.md); any can be overridden.
MICROSCOPY_DEFAULTS: dict[str, dict[str, Any]] = {
    "ppm": {"steps": 300, "lr": 0.03, "init": "prior", "aux_steps": 1},
    "ppm-sim": {"steps": 300, "lr": 0.03, "init": "adjoint", "aux_steps": 1},
    "rlsd": {"steps": 300, "lr": 0.03},
    "ikl": {"steps": 300, "lr": 0.03},
    "red-diff": {"steps": 300},
    "dps": {"steps": 100},
}


@dataclass
class SuperResolutionResult:
    """Posterior of the fine image, in the input's intensity units.

    ``samples`` is ``(n, H', W')``; ``mean`` and ``std`` are ``(H', W')``. For the deterministic
    baselines there is one sample and ``std`` is all zeros. ``parameters`` records the run.
    """

    samples: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    peak_memory_mb: float = 0.0


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB (``getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024


def upsample(widefield: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic upsampling by ``scale`` with pixel areas aligned (each camera pixel -> scale x scale)."""
    tensor = torch.as_tensor(np.asarray(widefield, dtype=np.float64))[None, None]
    return F.interpolate(tensor, scale_factor=scale, mode="bicubic", align_corners=False)[0, 0].numpy()


def richardson_lucy(widefield: np.ndarray, psf: np.ndarray, scale: int, iterations: int = 30) -> np.ndarray:
    """Richardson-Lucy deconvolution (scikit-image) of the bicubic-upsampled widefield image.

    The background (0.1 percentile) is subtracted first, as Richardson-Lucy assumes Poisson
    counts without offset, and added back after.
    """
    from skimage.restoration import richardson_lucy as skimage_rl

    up = upsample(widefield, scale)
    background = float(np.percentile(up, 0.1))
    signal = np.clip(up - background, 0, None)
    peak = float(signal.max())
    if peak <= 0:
        return up
    deconvolved = skimage_rl(signal / peak, psf, num_iter=iterations, clip=False)
    return deconvolved * peak + background


def _check_image(widefield: np.ndarray) -> np.ndarray:
    image = np.asarray(widefield, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"widefield must be a 2-D image; got shape {image.shape}")
    if min(image.shape) < 8:
        raise ValueError(f"widefield must be at least 8x8 pixels; got {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError("widefield contains NaN or infinite pixels")
    if float(image.max() - image.min()) <= 0:
        raise ValueError("widefield is constant; there is nothing to reconstruct")
    return image


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` with at least ``overlap`` shared."""
    if tile >= length:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def _axis_weight(start: int, stop: int, starts: list[int], tile: int, scale: int) -> np.ndarray:
    """Blending weight along one axis of the tile ``[start, stop)`` (camera pixels), on the fine grid.

    It rises linearly from 0 across the overlap with the previous tile and falls to 0 across
    the overlap with the next one, so two overlapping weights sum to 1.
    """
    previous_ends = [s + tile for s in starts if s < start]
    next_starts = [s for s in starts if start < s < stop]
    n = (stop - start) * scale
    rise = (max(previous_ends) - start) * scale if previous_ends else 0
    fall = (stop - min(next_starts)) * scale if next_starts else 0
    x = np.arange(n) + 0.5
    weight = np.ones(n)
    if rise > 0:
        weight = np.minimum(weight, x / rise)
    if fall > 0:
        weight = np.minimum(weight, (n - x) / fall)
    return weight


class TileBlender:
    """Overlapping tiles of an image (camera pixels) and the blend of their fine-grid samples.

    Tiles of ``tile`` pixels overlap by at least ``overlap``. Each tile's samples are weighted by
    linear ramps across its overlaps (which sum to 1) and added to the samples, the mean and the
    variance of the whole fine image.
    """

    def __init__(self, shape: tuple[int, int], tile: int, overlap: int, scale: int, n_samples: int):
        height, width = shape
        self.scale = scale
        self.rows, self.cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
        self.tile = tile
        self.tiles = [(r, c, min(r + tile, height), min(c + tile, width)) for r in self.rows for c in self.cols]
        fine = (height * scale, width * scale)
        self.total = np.zeros(fine)
        self.samples = np.zeros((n_samples, *fine))
        self.variance = np.zeros(fine)
        self.mean = np.zeros(fine)

    def add(self, index: int, samples: np.ndarray) -> None:
        """Accumulate the ``(n, h, w)`` fine-grid samples of tile ``index``."""
        top, left, bottom, right = self.tiles[index]
        s = self.scale
        w = np.outer(_axis_weight(top, bottom, self.rows, self.tile, s), _axis_weight(left, right, self.cols, self.tile, s))
        region = (slice(top * s, bottom * s), slice(left * s, right * s))
        self.total[region] += w
        self.samples[(slice(None), *region)] += w * samples
        self.mean[region] += w * samples.mean(0)
        self.variance[region] += w * (samples.var(0, ddof=1) if samples.shape[0] > 1 else 0)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Blended samples ``(n, H', W')``, mean and standard deviation ``(H', W')``."""
        return self.samples / self.total, self.mean / self.total, np.sqrt(self.variance / self.total)


def super_resolve(
    widefield: np.ndarray,
    psf: np.ndarray,
    prior: Prior | None,
    scale: int = 2,
    method: str = "ppm",
    n_samples: int = 8,
    steps: int | None = None,
    noise: SignalDependentNoise | None = None,
    tile_size: int | None = None,
    tile_overlap: int | None = None,
    seed: int = 0,
    rl_iterations: int = 30,
    callback: Callable[[dict], bool | None] | None = None,
    **options: Any,
) -> SuperResolutionResult:
    """Posterior samples of the fine image behind a widefield image.

    Parameters
    ----------
    widefield : (H, W) array
        Camera image (ADU), any size.
    psf : (h, w) array
        PSF on the fine grid (see :mod:`ppm_napari.psf`).
    prior : Prior
        Diffusion prior of fine images (not needed for the deterministic baselines).
    scale : int
        Fine pixels per camera pixel along each axis.
    method : one of :data:`METHODS`
        Posterior methods of :func:`ppm_core.reconstruct`, or ``"richardson-lucy"`` / ``"bicubic"``.
    n_samples, steps, seed, options
        Passed to :func:`ppm_core.reconstruct`; ``MICROSCOPY_DEFAULTS`` fills what is not given.
        For ``"richardson-lucy"``, ``steps`` sets the number of iterations (``rl_iterations``).
    noise : SignalDependentNoise, optional
        Noise of ``widefield`` in its units; estimated from the image when omitted.
    tile_size, tile_overlap : int, optional
        Tile side and overlap in camera pixels; whole image when ``tile_size`` is omitted. The
        overlap defaults to 16 pixels or twice the PSF radius, whichever is larger.
    callback : callable, optional
        Gets ``{"tile", "tiles", "iteration", "steps", "losses", "preview", "origin"}`` after each
        iteration. ``preview`` is the current mean of the tile in the input's units, and ``origin``
        its top-left corner on the fine grid. Returning ``True`` cancels with
        ``ReconstructionCancelled``.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    image = _check_image(widefield)
    psf = np.asarray(psf, dtype=np.float64)
    SuperResolution(psf, scale, image.shape)  # raises ValueError for a bad psf or scale
    if noise is None:
        noise = estimate_noise(image)
    parameters: dict[str, Any] = {
        "method": method,
        "scale": scale,
        "input_shape": list(image.shape),
        "psf_shape": list(psf.shape),
        "noise": {"model": "signal-dependent Gaussian", "slope": noise.slope, "intercept": noise.intercept},
        "seed": seed,
    }

    if method in DETERMINISTIC_METHODS:
        if method == "richardson-lucy" and steps is not None:
            rl_iterations = steps  # steps means iterations for Richardson-Lucy
        estimate = richardson_lucy(image, psf, scale, rl_iterations) if method == "richardson-lucy" else upsample(image, scale)
        if method == "richardson-lucy":
            parameters["iterations"] = rl_iterations
        return SuperResolutionResult(
            estimate[None], estimate, np.zeros_like(estimate), parameters, time.perf_counter() - start, peak_memory_mb()
        )

    if prior is None:
        raise ValueError(f"method {method!r} needs a prior")
    channels = getattr(prior, "in_channels", 1)
    if channels != 1:
        raise ValueError(f"the prior models images with {channels} channels; a widefield image has 1. Use a single-channel prior")
    if method not in RECONSTRUCT_METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    settings = dict(MICROSCOPY_DEFAULTS.get(method, {}))
    settings.update(options)
    if steps is not None:
        settings["steps"] = steps
    steps = settings.pop("steps")

    # Affine map into the prior's space, from a Richardson-Lucy estimate of the fine image.
    reference = torch.as_tensor(richardson_lucy(image, psf, scale, rl_iterations))
    _, norm = prior.normalize(reference) if hasattr(prior, "normalize") else (None, {"offset": 0.0, "scale": 1.0})
    offset, unit = float(norm["offset"]), float(norm["scale"])
    y_all = (image - offset) / unit
    noise_p = noise.rescaled(offset, unit)
    parameters |= {"steps": steps, "n_samples": n_samples, "options": settings, "normalization": {"offset": offset, "scale": unit}}

    height, width = image.shape
    radius = max(psf.shape) // 2
    if tile_size is not None and tile_size < 16:
        raise ValueError(f"tile_size must be at least 16 camera pixels; got {tile_size}")
    tile = tile_size or max(height, width)
    overlap = tile_overlap if tile_overlap is not None else max(16, 2 * math.ceil(radius / scale))
    if tile < max(height, width) and not 0 < overlap < tile // 2 + 1:
        origin = "given" if tile_overlap is not None else "the default, max(16, PSF diameter / scale)"
        raise ValueError(f"tile_overlap ({overlap}, {origin}) must be positive and at most half of tile_size ({tile}); "
                         f"use a tile_size of at least {2 * overlap} or a smaller tile_overlap")
    blender = TileBlender((height, width), tile, overlap, scale, n_samples)
    parameters |= {"tile_size": tile_size, "tile_overlap": overlap if len(blender.tiles) > 1 else None, "tiles": len(blender.tiles)}

    for index, (top, left, bottom, right) in enumerate(blender.tiles):
        y = torch.as_tensor(y_all[top:bottom, left:right], dtype=torch.float32)[None, None]
        operator = SuperResolution(psf, scale, tuple(y.shape[-2:]), noise=noise_p)

        def report(state: dict, index: int = index, origin: tuple[int, int] = (top * scale, left * scale)) -> bool | None:
            if callback is None:
                return None
            # The current mean of this tile in the input's units, and where it sits on the fine grid.
            preview = state["mean"][0].double().numpy() * unit + offset
            return callback(state | {"tile": index + 1, "tiles": len(blender.tiles), "preview": preview, "origin": origin})

        logger.info("tile %d/%d: rows %d-%d, columns %d-%d", index + 1, len(blender.tiles), top, bottom, left, right)
        posterior = reconstruct(y, operator, prior, method=method, n_samples=n_samples, steps=steps, seed=seed + index, callback=report, **settings)
        blender.add(index, posterior.samples[:, 0].double().numpy() * unit + offset)

    samples, mean, std = blender.result()
    return SuperResolutionResult(samples, mean, std, parameters, time.perf_counter() - start, peak_memory_mb())
