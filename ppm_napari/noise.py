"""Noise of a widefield image, estimated from the image itself.

Model: ``Var y = slope * E[y] + intercept`` (Poisson-Gaussian camera noise in ADU; see
``ppm_core.operators.SignalDependentNoise``). The estimate follows the usual recipe for
camera noise from one frame:

1. High-pass: ``r = K * y`` with the 3x3 kernel ``[[1,-2,1],[-2,4,-2],[1,-2,1]]`` (Immerkær
   1996). It removes locally linear signal and the smooth part of curvature, and for
   independent noise ``Var r = 36 Var y``. A widefield image sampled at or above Nyquist is
   smooth on 3 pixels, so ``r`` is mostly noise.
2. Local level: ``m`` = 5x5 mean of ``y``.
3. Bin pixels into 16 quantile bins of ``m``, or fewer for small images (at least 100 pixels
   per bin). In each bin the variance is the squared robust scale of ``r`` (1.4826 x median
   absolute deviation) divided by 36. The robust scale ignores the edges of bright structures,
   where signal leaks into ``r``.
4. Fit ``slope`` and ``intercept`` by least squares across bins, weighting each bin by its
   pixel count over its variance squared (the variance of a variance estimate). A
   negative slope is clipped to zero (pure Gaussian noise).

The estimate is biased high where the image has structure finer than 3 pixels, such as on
images sampled below Nyquist, and is then an upper bound.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from ppm_core.operators import SignalDependentNoise

logger = logging.getLogger(__name__)

_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)


def estimate_noise(image: np.ndarray, bins: int = 16) -> SignalDependentNoise:
    """Fit ``Var y = slope * E[y] + intercept`` to one 2-D image (see the module docstring)."""
    y = np.asarray(image, dtype=np.float64)
    if y.ndim != 2 or min(y.shape) < 16:
        raise ValueError(f"noise estimation needs a 2-D image of at least 16x16 pixels; got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("noise estimation: the image contains NaN or infinite values")
    residual = ndimage.convolve(y, _KERNEL, mode="reflect")[2:-2, 2:-2]
    level = ndimage.uniform_filter(y, 5, mode="reflect")[2:-2, 2:-2]
    bins = max(1, min(bins, residual.size // 100))  # at least 100 pixels per bin
    edges = np.quantile(level, np.linspace(0, 1, bins + 1))
    index = np.clip(np.searchsorted(edges, level, side="right") - 1, 0, bins - 1)
    means, variances, counts = [], [], []
    for b in range(bins):
        r = residual[index == b]
        if r.size < 50 and bins > 1:
            continue
        mad = np.median(np.abs(r - np.median(r)))
        means.append(level[index == b].mean())
        variances.append((1.4826 * mad) ** 2 / 36)
        counts.append(r.size)
    means, variances, counts = map(np.asarray, (means, variances, counts))
    if len(means) == 0 or not np.any(variances > 0):
        raise ValueError("noise estimation failed: the image is constant or too quantized to measure its noise")
    if len(means) == 1:  # too few pixels to see a signal dependence: Gaussian noise
        floor = 0.1 * float(variances[0])
        return SignalDependentNoise(0.0, float(variances[0]), floor)
    weights = counts / np.maximum(variances, variances[variances > 0].min()) ** 2
    design = np.stack([means, np.ones_like(means)], 1)
    sw = np.sqrt(weights)
    slope, intercept = np.linalg.lstsq(design * sw[:, None], variances * sw, rcond=None)[0]
    if slope <= 0:
        slope, intercept = 0.0, float(np.average(variances, weights=counts))
    floor = 0.1 * float(variances.min()) if variances.min() > 0 else 0.1 * float(variances.max())
    logger.info("estimated noise: Var y = %.4g * y + %.4g (from %d bins)", slope, intercept, len(means))
    return SignalDependentNoise(float(slope), float(intercept), floor)
