"""Inverse problems with closed-form posteriors, for tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .operators import MatrixOperator
from .priors import GaussianMixturePrior, GaussianPrior


@dataclass
class ExactProblem:
    """A prior, an operator, one measurement and the exact posterior."""

    name: str
    prior: GaussianPrior | GaussianMixturePrior
    operator: MatrixOperator
    y: Tensor
    posterior: GaussianPrior | GaussianMixturePrior

    def exact_samples(self, n: int, seed: int = 12345) -> Tensor:
        return self.posterior.sample(n, torch.Generator().manual_seed(seed))


def linear_gaussian_problem(dim: int = 16, n_measurements: int = 8, noise_std: float = 0.2, seed: int = 0) -> ExactProblem:
    """Gaussian prior with variances from 1 to 0.1 on random axes, seen through a random ``(m, d)`` matrix.

    With ``m < d`` the operator is rank-deficient: the null space keeps (a projection of) the prior's spread.
    """
    generator = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    variances = torch.logspace(0, -1, dim, dtype=torch.float64)
    prior = GaussianPrior(torch.zeros(dim, dtype=torch.float64), rotation @ torch.diag(variances) @ rotation.T)
    matrix = torch.randn(n_measurements, dim, generator=generator, dtype=torch.float64) / dim**0.5
    operator = MatrixOperator(matrix, noise_std=noise_std)
    x_true = prior.sample(1, generator)
    y = operator.simulate(x_true, generator=generator)
    return ExactProblem("linear-gaussian", prior, operator, y, prior.posterior(matrix, noise_std, y))


def mixture_problem(shift: float = 0.0, y_value: float = 0.5, noise_std: float = 0.3, projection: tuple[float, float] = (1.0, -2.0)) -> ExactProblem:
    """Two-component 2-D Gaussian mixture seen through one noisy projection ``y = a^T x + noise``.

    Components at ``(-2, -1)`` and ``(2, 1)`` plus ``shift * (2, 1)``, covariance ``0.25 I``,
    weights 1/2. With the default ``a = (1, -2)`` both modes project to 0, so the posterior is
    bimodal with the prior's weights, and with ``shift = 0`` symmetric under ``x -> -x``. Other
    projections make the data favour one mode, so the posterior weights differ from the prior's.
    """
    means = torch.tensor([[-2.0, -1.0], [2.0, 1.0]], dtype=torch.float64) + shift * torch.tensor([2.0, 1.0], dtype=torch.float64)
    covs = torch.stack([0.25 * torch.eye(2, dtype=torch.float64)] * 2)
    prior = GaussianMixturePrior(torch.tensor([0.5, 0.5], dtype=torch.float64), means, covs)
    matrix = torch.tensor([projection], dtype=torch.float64)
    y = torch.tensor([y_value], dtype=torch.float64).reshape(1, 1, 1)
    name = "mixture" if (shift, tuple(projection)) == (0.0, (1.0, -2.0)) else f"mixture a=({projection[0]:g}, {projection[1]:g}), y={y_value:g}"
    return ExactProblem(name, prior, MatrixOperator(matrix, noise_std=noise_std), y, prior.posterior(matrix, noise_std, y))


def mode_assignment(samples: Tensor, mixture: GaussianMixturePrior) -> Tensor:
    """Index of the most responsible component for each sample (at sigma -> 0), shape ``(n,)``."""
    return mixture.responsibilities(samples, 1e-6).argmax(dim=1)


def stationary_field_covariance(size: int, correlation: float, power: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """Covariance of a periodic stationary Gaussian field on a ``size x size`` grid, shape ``(d, d)``.

    Power spectrum ``P(k) ∝ (1 + (|k| / correlation)^2)^-power`` with ``k`` in cycles per image,
    scaled so that every pixel has unit variance.
    """
    k = torch.fft.fftfreq(size, dtype=dtype) * size
    radius = (k[:, None] ** 2 + k[None, :] ** 2).sqrt()
    spectrum = (1 + (radius / correlation) ** 2) ** -power
    spectrum = spectrum / spectrum.mean()
    basis = torch.eye(size * size, dtype=dtype).reshape(-1, size, size)
    cov = torch.fft.ifft2(torch.fft.fft2(basis) * spectrum).real.reshape(size * size, size * size)
    return 0.5 * (cov + cov.T)


def operator_matrix(operator) -> Tensor:
    """Dense matrix of a linear operator, shape ``(m, d)``, by applying it to the standard basis."""
    d = 1
    for n in operator.in_shape:
        d *= int(n)
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *operator.in_shape)
    with torch.no_grad():
        return operator.A(basis).reshape(d, -1).T.contiguous()


def _field_problem(name: str, prior_cov: Tensor, operator, noise_std: float, seed: int, dtype: torch.dtype) -> ExactProblem:
    """Draw a truth and its measurement in float64; hand out the prior, operator and ``y`` in ``dtype``."""
    shape = tuple(operator.in_shape)
    prior = GaussianPrior(torch.zeros(shape, dtype=torch.float64), prior_cov)
    generator = torch.Generator().manual_seed(seed)
    x_true = prior.sample(1, generator)
    y = operator.simulate(x_true, generator=generator)
    posterior = prior.posterior(operator_matrix(operator), noise_std, y)
    return ExactProblem(name, prior.to(dtype), operator.to(dtype), y.to(dtype), posterior)


def gaussian_field_problem(size: int = 16, noise_std: float = 0.05, seed: int = 0, dtype: torch.dtype = torch.float32) -> ExactProblem:
    """Smooth stationary Gaussian field seen through 2x2 area downsampling plus Gaussian noise.

    The problem of ``ppm-method.md`` §9: spectrum ``(1 + (|k|/2)^2)^-2``, ``d = size^2``, and
    ``size^2 / 4`` measurements. The posterior is much narrower than the prior in the directions
    the block means fix (std about 0.1 against 0.86-2.1) and close to the prior in the others.
    """
    from .operators import Downsampling

    operator = Downsampling(2, (1, size, size), noise_std=noise_std).double()
    cov = stationary_field_covariance(size, correlation=2.0, power=2.0)
    return _field_problem(f"gaussian-field {size}x{size}, 2x downsampling", cov, operator, noise_std, seed, dtype)


def masked_blur_problem(size: int = 32, keep: float = 0.5, blur_std: float = 1.0, noise_std: float = 0.1, seed: int = 0, dtype: torch.dtype = torch.float32) -> ExactProblem:
    """Rough stationary Gaussian field, blurred, then seen at a random ``keep`` fraction of pixels.

    Spectrum ``(1 + (|k|/6)^2)^-1`` (rougher than :func:`gaussian_field_problem`), Gaussian PSF of
    ``blur_std`` pixels with zero padding, a random mask (fixed by ``seed``) and Gaussian noise.
    The posterior is non-stationary: observed pixels are tight, hidden ones keep much of the prior.
    """
    from .operators import ComposedOperator, Convolution, Inpainting

    generator = torch.Generator().manual_seed(seed + 1000)
    radius = int(3 * blur_std + 0.5)
    grid = torch.arange(-radius, radius + 1, dtype=torch.float64)
    psf = torch.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * blur_std**2))
    psf = psf / psf.sum()
    mask = torch.rand(size, size, generator=generator, dtype=torch.float64) < keep
    shape = (1, size, size)
    operator = ComposedOperator(Convolution(psf, shape), Inpainting(mask, shape), noise_std=noise_std).double()
    cov = stationary_field_covariance(size, correlation=6.0, power=1.0)
    return _field_problem(f"masked blur {size}x{size}, {keep:.0%} of pixels", cov, operator, noise_std, seed, dtype)
