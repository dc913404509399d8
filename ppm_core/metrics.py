"""Calibration and distance metrics for posterior samples."""

from __future__ import annotations

import torch
from torch import Tensor


def interval_coverage(samples: Tensor, truths: Tensor, level: float = 0.9) -> float:
    """Fraction of ``truths`` inside the samples' per-pixel central credible interval.

    Parameters
    ----------
    samples : (n, ...) tensor
        Posterior samples; the interval runs between their ``(1 - level) / 2`` and
        ``(1 + level) / 2`` empirical quantiles at each pixel.
    truths : (m, ...) or (...) tensor
        One ground truth, or draws from the exact posterior; every pixel of every truth counts.

    Returns
    -------
    float
        Coverage in [0, 1]; a calibrated posterior gives ``level``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    if truths.shape == samples.shape[1:]:
        truths = truths.unsqueeze(0)
    if truths.shape[1:] != samples.shape[1:]:
        raise ValueError(f"truths must have shape {tuple(samples.shape[1:])} or (m, ...) of it; got {tuple(truths.shape)}")
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=samples.dtype)
    low, high = torch.quantile(samples.reshape(samples.shape[0], -1), q, dim=0)
    flat = truths.reshape(truths.shape[0], -1).to(samples.dtype)
    return float(((flat >= low) & (flat <= high)).double().mean())


def sliced_wasserstein(a: Tensor, b: Tensor, n_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two sample sets of equal size, shape ``(n, ...)``.

    Averages the squared 1-D Wasserstein-2 distance over random unit directions, then takes
    the square root.
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    flat_a, flat_b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(flat_a.shape[1], n_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    proj_a = torch.sort(flat_a @ directions, dim=0).values
    proj_b = torch.sort(flat_b @ directions, dim=0).values
    return float(((proj_a - proj_b) ** 2).mean().sqrt())


def psnr(estimate: Tensor, reference: Tensor, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; ``data_range`` defaults to the reference's max - min."""
    if estimate.shape != reference.shape:
        raise ValueError(f"estimate and reference must have the same shape; got {tuple(estimate.shape)} and {tuple(reference.shape)}")
    data_range = float(reference.max() - reference.min()) if data_range is None else data_range
    mse = float(((estimate.double() - reference.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(data_range**2 / mse)).item()


def diversity(samples: Tensor) -> float:
    """Mean over sample pairs of ``1 - cos(x_i, x_j)``; 0 when all samples are parallel."""
    flat = samples.reshape(samples.shape[0], -1).double()
    if flat.shape[0] < 2:
        return 0.0
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    cosines = unit @ unit.T
    n = flat.shape[0]
    return float((1 - cosines).sum() / (n * (n - 1)))


def band_spread_ratios(samples: Tensor, posterior_cov: Tensor, bands: int = 8) -> list[float]:
    """Particle/posterior standard deviation along the posterior's eigenvectors, in bands.

    The eigenvectors of ``posterior_cov`` are sorted from the smallest posterior variance (the
    directions the data fix) to the largest, and split into ``bands`` groups whose sizes differ
    by at most one.
    Each entry is the median over a group of ``std(samples projected on v) / sqrt(lambda_v)``:
    1 is calibrated, below 1 collapsed, above 1 over-dispersed. A per-pixel ratio can look
    right while whole groups of directions are collapsed, which this shows.

    Parameters
    ----------
    samples : (n, ...) tensor with ``d`` entries per sample, ``n >= 2``
    posterior_cov : (d, d) tensor
    bands : int
        Number of groups, at most ``d``.
    """
    flat = samples.reshape(samples.shape[0], -1).to(torch.float64)
    d = flat.shape[1]
    if flat.shape[0] < 2:
        raise ValueError(f"samples must hold at least 2 samples; got {flat.shape[0]}")
    if tuple(posterior_cov.shape) != (d, d):
        raise ValueError(f"posterior_cov must have shape ({d}, {d}) to match the samples; got {tuple(posterior_cov.shape)}")
    if isinstance(bands, bool) or not isinstance(bands, int) or not 1 <= bands <= d:
        raise ValueError(f"bands must be an integer in [1, {d}]; got {bands!r}")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("samples contain NaN or infinite values")
    eigenvalues, eigenvectors = torch.linalg.eigh(posterior_cov.to(torch.float64))
    if float(eigenvalues[0]) < -1e-8 * max(float(eigenvalues[-1]), 1e-300):
        raise ValueError(f"posterior_cov must be positive semi-definite; its smallest eigenvalue is {float(eigenvalues[0]):.3g}")
    projected = (flat - flat.mean(0)) @ eigenvectors
    spread = projected.pow(2).sum(0).div(flat.shape[0] - 1).sqrt() / eigenvalues.clamp_min(1e-30).sqrt()
    return [float(group.quantile(0.5)) for group in torch.tensor_split(spread, bands)]
