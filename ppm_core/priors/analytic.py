"""Priors with exact denoisers: Gaussian and Gaussian mixture. They serve as test oracles."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Prior, as_sigma


def _event_shape(mean: Tensor) -> tuple[int, int, int]:
    if mean.ndim == 1:
        return (1, 1, mean.shape[0])
    if mean.ndim == 3:
        return tuple(mean.shape)
    raise ValueError(f"mean must have shape (d,) or (C, H, W); got {tuple(mean.shape)}")


def _check_cov(cov: Tensor, d: int, name: str) -> Tensor:
    if cov.shape != (d, d):
        raise ValueError(f"{name} must have shape ({d}, {d}) to match the mean; got {tuple(cov.shape)}")
    if not torch.isfinite(cov).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if not torch.allclose(cov, cov.T, atol=1e-8 * float(cov.abs().max()) + 1e-12):
        raise ValueError(f"{name} must be symmetric")
    return 0.5 * (cov + cov.T)


def _eigh_psd(cov: Tensor, name: str) -> tuple[Tensor, Tensor]:
    # float64 even for float32 input: a float32 covariance with denormal entries (common for
    # posteriors) makes LAPACK's eigh 10-100x slower, and the extra precision is free at these sizes.
    eigenvalues, eigenvectors = torch.linalg.eigh(cov.double())
    eigenvalues, eigenvectors = eigenvalues.to(cov.dtype), eigenvectors.to(cov.dtype)
    if float(eigenvalues.min()) < -1e-8 * float(eigenvalues.abs().max()):
        raise ValueError(f"{name} must be positive semi-definite; smallest eigenvalue {float(eigenvalues.min()):.3g}")
    return eigenvalues.clamp_min(0.0), eigenvectors


class GaussianPrior(Prior):
    """Gaussian prior ``N(mean, cov)`` with its exact denoiser.

    Parameters
    ----------
    mean : (d,) or (C, H, W) tensor
        Prior mean. A 1-D mean defines a vector problem on ``(batch, 1, 1, d)`` tensors.
    cov : (d, d) tensor
        Symmetric positive semi-definite covariance, ``d = C*H*W``.

    Notes
    -----
    With ``cov = U diag(lambda) U^T``, the diffused density is ``N(mean, cov + sigma^2 I)`` and
    ``D(x, sigma) = mean + U diag(lambda / (lambda + sigma^2)) U^T (x - mean)``.
    """

    def __init__(self, mean: Tensor, cov: Tensor):
        super().__init__()
        mean = torch.as_tensor(mean)
        if not mean.is_floating_point():
            raise TypeError(f"mean must have a floating dtype (float32 or float64); got {mean.dtype}")
        self.event_shape = _event_shape(mean)
        d = mean.numel()
        cov = _check_cov(torch.as_tensor(cov, dtype=mean.dtype), d, "cov")
        eigenvalues, eigenvectors = _eigh_psd(cov, "cov")
        self.register_buffer("mean", mean.reshape(-1))
        self.register_buffer("cov", cov)
        self.register_buffer("eigenvalues", eigenvalues)
        self.register_buffer("eigenvectors", eigenvectors)

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def denoiser(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        self.check_input(x)
        sigma_b = as_sigma(sigma, x).reshape(-1, 1)
        centred = x.reshape(x.shape[0], -1) - self.mean
        coeffs = centred @ self.eigenvectors
        shrink = self.eigenvalues / (self.eigenvalues + sigma_b**2)
        return (self.mean + (coeffs * shrink) @ self.eigenvectors.T).reshape(x.shape)

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """Return ``log p_sigma(x)``, shape ``(batch,)``. ``sigma = 0`` needs a full-rank ``cov``."""
        self.check_input(x)
        sigma_t = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        variances = self.eigenvalues + (sigma_t.reshape(-1, 1) if sigma_t.ndim else sigma_t) ** 2
        coeffs = (x.reshape(x.shape[0], -1) - self.mean) @ self.eigenvectors
        return -0.5 * ((coeffs**2 / variances).sum(-1) + torch.log(2 * math.pi * variances).sum(-1))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` exact samples, shape ``(n, C, H, W)``."""
        z = torch.randn(n, self.dim, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        x = self.mean + (z * self.eigenvalues.sqrt()) @ self.eigenvectors.T
        return x.reshape(n, *self.event_shape)

    def posterior(self, matrix: Tensor, noise_std: float, y: Tensor) -> GaussianPrior:
        """Return the exact posterior ``N(m, S)`` for ``y = matrix @ x + N(0, noise_std^2 I)``.

        Parameters
        ----------
        matrix : (m, d) tensor
        noise_std : float
            Measurement noise standard deviation.
        y : (m,) tensor or any tensor with m entries
        """
        matrix = torch.as_tensor(matrix, dtype=self.cov.dtype)
        y = torch.as_tensor(y, dtype=self.cov.dtype).reshape(-1)
        if matrix.ndim != 2 or matrix.shape[1] != self.dim:
            raise ValueError(f"matrix must have shape (m, {self.dim}); got {tuple(matrix.shape)}")
        if y.numel() != matrix.shape[0]:
            raise ValueError(f"y must have {matrix.shape[0]} entries to match matrix; got {y.numel()}")
        # Gain form, which stays valid when cov is singular.
        s = matrix @ self.cov @ matrix.T + noise_std**2 * torch.eye(matrix.shape[0], dtype=matrix.dtype)
        gain = torch.linalg.solve(s, matrix @ self.cov).T
        mean = self.mean + gain @ (y - matrix @ self.mean)
        cov = self.cov - gain @ matrix @ self.cov
        cov = 0.5 * (cov + cov.T)  # remove round-off asymmetry
        return GaussianPrior(mean.reshape(self.event_shape) if self.event_shape[:2] != (1, 1) else mean, cov)


class GaussianMixturePrior(Prior):
    """Mixture of Gaussians ``sum_k w_k N(mean_k, cov_k)`` with its exact denoiser.

    Parameters
    ----------
    weights : (K,) tensor
        Non-negative mixture weights; they are normalized to sum to one.
    means : (K, d) tensor
    covs : (K, d, d) tensor
        Symmetric positive semi-definite covariances.

    Notes
    -----
    The denoiser is the responsibility-weighted sum of the component denoisers, with
    responsibilities ``r_k(x) ∝ w_k N(x; mean_k, cov_k + sigma^2 I)``.
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor):
        super().__init__()
        weights = torch.as_tensor(weights)
        means = torch.as_tensor(means, dtype=weights.dtype if weights.is_floating_point() else None)
        if not means.is_floating_point():
            raise TypeError(f"means must have a floating dtype (float32 or float64); got {means.dtype}")
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d); got {tuple(means.shape)}")
        k, d = means.shape
        weights = weights.to(means.dtype)
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},) to match means; got {tuple(weights.shape)}")
        if not bool(torch.all(weights >= 0)) or float(weights.sum()) <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum; got {weights.tolist()}")
        covs = torch.as_tensor(covs, dtype=means.dtype)
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must have shape ({k}, {d}, {d}); got {tuple(covs.shape)}")
        components = [GaussianPrior(means[i], covs[i]) for i in range(k)]
        self.components = torch.nn.ModuleList(components)
        self.event_shape = (1, 1, d)
        self.register_buffer("weights", weights / weights.sum())

    def responsibilities(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Return the posterior component probabilities given ``x_sigma = x``, shape ``(batch, K)``."""
        sigma_flat = as_sigma(sigma, x).reshape(-1)
        log_joint = torch.stack(
            [torch.log(w) + c.log_prob(x, sigma_flat) for w, c in zip(self.weights, self.components)], dim=-1
        )
        return torch.softmax(log_joint, dim=-1)

    def denoiser(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        self.check_input(x)
        r = self.responsibilities(x, sigma)
        per_component = torch.stack([c.denoiser(x, sigma) for c in self.components], dim=1)
        return (r.reshape(*r.shape, 1, 1, 1) * per_component).sum(dim=1)

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """Return ``log p_sigma(x)``, shape ``(batch,)``."""
        sigma_t = torch.as_tensor(sigma, dtype=x.dtype)
        log_joint = torch.stack(
            [torch.log(w) + c.log_prob(x, sigma_t) for w, c in zip(self.weights, self.components)], dim=-1
        )
        return torch.logsumexp(log_joint, dim=-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` exact samples, shape ``(n, 1, 1, d)``."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        draws = torch.stack([c.sample(n, generator) for c in self.components], dim=1)
        return draws[torch.arange(n), labels]

    def posterior(self, matrix: Tensor, noise_std: float, y: Tensor) -> GaussianMixturePrior:
        """Return the exact posterior mixture for ``y = matrix @ x + N(0, noise_std^2 I)``.

        Each component becomes its Gaussian posterior and its weight is multiplied by the
        component's evidence ``N(y; matrix mean_k, matrix cov_k matrix^T + noise_std^2 I)``.
        """
        matrix = torch.as_tensor(matrix, dtype=self.weights.dtype)
        y = torch.as_tensor(y, dtype=self.weights.dtype).reshape(-1)
        log_weights, means, covs = [], [], []
        for weight, component in zip(self.weights, self.components):
            evidence = GaussianPrior(matrix @ component.mean, matrix @ component.cov @ matrix.T)
            log_weights.append(torch.log(weight) + evidence.log_prob(y.reshape(1, 1, 1, -1), noise_std)[0])
            posterior = component.posterior(matrix, noise_std, y)
            means.append(posterior.mean)
            covs.append(posterior.cov)
        weights = torch.softmax(torch.stack(log_weights), dim=0)
        return GaussianMixturePrior(weights, torch.stack(means), torch.stack(covs))

