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
