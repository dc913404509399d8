"""Scores of a super-resolved posterior against a ground truth (such as a SIM reconstruction).

The ground truth and the reconstruction are in different intensity units (SIM software output
against camera ADU), so every score first puts them on a common scale, and the choice moves
PSNR by several dB. We report both of these protocols and name each:

- ``minmax``: each image min-max normalized to [0, 1], data range 1 (the DFCAN/BioSR protocol);
- ``fitted``: the estimate mapped by the affine least-squares fit ``a x + b`` onto the ground
  truth, data range = ground truth max - min.

SSIM (scikit-image, Gaussian window of sigma 1.5 as in Wang et al. 2004) uses the same two
normalizations. Coverage of the central 90% interval counts ground-truth pixels inside the
samples' per-pixel 5-95% quantiles, after mapping the ground truth into the samples' units by
the inverse of the fitted affine map (fit on the posterior mean). Diversity is the mean pairwise
``1 - cos`` of the samples after subtracting the mean's minimum (the background level), so
that a shared offset does not hide differences.
"""

from __future__ import annotations

import numpy as np


def _check_pair(estimate: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    estimate = np.asarray(estimate, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if estimate.shape != truth.shape:
        raise ValueError(f"the ground truth has shape {truth.shape} but the reconstruction has {estimate.shape}; "
                         "the ground truth must be on the super-resolved grid")
    if not np.all(np.isfinite(truth)):
        raise ValueError("the ground truth contains NaN or infinite pixels")
    if truth.max() <= truth.min():
        raise ValueError("the ground truth is constant")
    return estimate, truth


def minmax(image: np.ndarray) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def affine_fit(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """``(a, b)`` minimizing ``||a estimate + b - truth||^2``."""
    design = np.stack([estimate.ravel(), np.ones(estimate.size)], 1)
    (a, b), *_ = np.linalg.lstsq(design, truth.ravel(), rcond=None)
    return float(a), float(b)


def _psnr(estimate: np.ndarray, truth: np.ndarray, data_range: float) -> float:
    mse = float(np.mean((estimate - truth) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def psnr(estimate: np.ndarray, truth: np.ndarray, protocol: str = "fitted") -> float:
    """PSNR in dB under the ``"minmax"`` or ``"fitted"`` protocol (module docstring)."""
    estimate, truth = _check_pair(estimate, truth)
    if protocol == "minmax":
        return _psnr(minmax(estimate), minmax(truth), 1.0)
    if protocol == "fitted":
        a, b = affine_fit(estimate, truth)
        return _psnr(a * estimate + b, truth, float(truth.max() - truth.min()))
    raise ValueError(f"protocol must be 'minmax' or 'fitted'; got {protocol!r}")


def ssim(estimate: np.ndarray, truth: np.ndarray, protocol: str = "fitted") -> float:
    """SSIM (scikit-image, Gaussian window) under the ``"minmax"`` or ``"fitted"`` protocol."""
    from skimage.metrics import structural_similarity

    estimate, truth = _check_pair(estimate, truth)
    if protocol == "minmax":
        return float(structural_similarity(minmax(estimate), minmax(truth), data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False))
    if protocol == "fitted":
        a, b = affine_fit(estimate, truth)
        rng = float(truth.max() - truth.min())
        return float(structural_similarity(a * estimate + b, truth, data_range=rng, gaussian_weights=True, sigma=1.5, use_sample_covariance=False))
    raise ValueError(f"protocol must be 'minmax' or 'fitted'; got {protocol!r}")


def coverage(samples: np.ndarray, mean: np.ndarray, truth: np.ndarray, level: float = 0.9) -> float:
    """Fraction of ground-truth pixels inside the samples' central ``level`` interval (module docstring)."""
    samples = np.asarray(samples, dtype=np.float64)
    mean, truth = _check_pair(mean, truth)
    if samples.ndim != 3 or samples.shape[1:] != truth.shape or samples.shape[0] < 2:
        raise ValueError(f"coverage needs at least 2 samples shaped (n, {truth.shape[0]}, {truth.shape[1]}); got {samples.shape}")
    a, b = affine_fit(mean, truth)
    truth_in_sample_units = (truth - b) / a
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return float(np.mean((truth_in_sample_units >= low) & (truth_in_sample_units <= high)))


def diversity(samples: np.ndarray) -> float:
    """Mean pairwise ``1 - cos`` of background-subtracted samples; 0 for a single sample."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.shape[0] < 2:
        return 0.0
    flat = (samples - samples.mean(0).min()).reshape(samples.shape[0], -1)
    unit = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-30)
    cosines = unit @ unit.T
    n = flat.shape[0]
    return float((n * n - cosines.sum()) / (n * (n - 1)))


def evaluate(samples: np.ndarray, mean: np.ndarray, truth: np.ndarray) -> dict[str, float | None]:
    """Compute all scores of one reconstruction; coverage is ``None`` for a single sample."""
    samples = np.asarray(samples)
    return {
        "psnr_minmax": psnr(mean, truth, "minmax"),
        "psnr_fitted": psnr(mean, truth, "fitted"),
        "ssim_minmax": ssim(mean, truth, "minmax"),
        "ssim_fitted": ssim(mean, truth, "fitted"),
        "coverage_90": coverage(samples, mean, truth) if samples.shape[0] > 1 else None,
        "diversity": diversity(samples),
    }
