"""The PPM surrogate's gradient against the closed-form gradient for Gaussian q and p."""

import torch

from ppm_core.inference import ppm_surrogate
from ppm_core.priors import GaussianPrior

DIM = 3
SIGMA = 0.8
N_DRAWS = 400_000


def _problem():
    generator = torch.Generator().manual_seed(0)
    factor = torch.randn(DIM, DIM, generator=generator, dtype=torch.float64)
    cov = factor @ factor.T / DIM + 0.5 * torch.eye(DIM, dtype=torch.float64)
    mean = torch.randn(DIM, generator=generator, dtype=torch.float64)
    mu0 = torch.randn(DIM, generator=generator, dtype=torch.float64)
    return GaussianPrior(mean, cov), mu0, torch.tensor(0.7, dtype=torch.float64)


def _closed_form_fisher(prior, mu, s):
    """``E_{q_sigma} ||s_q - s_p||^2`` for ``q = N(mu, s^2 I)``, ``p = N(m, C)``, both diffused to SIGMA.

    With ``P = (C + sigma^2 I)^-1`` and ``v_q = s^2 + sigma^2``, the score gap at ``x ~ q_sigma`` is
    ``(P - I / v_q)(x - mu) + P (mu - m)``, whose mean square is below.
    """
    v_q = s**2 + SIGMA**2
    precision = torch.linalg.inv(prior.cov + SIGMA**2 * torch.eye(DIM, dtype=torch.float64))
    b = precision - torch.eye(DIM, dtype=torch.float64) / v_q
    return v_q * torch.trace(b @ b) + (precision @ (mu - prior.mean)).pow(2).sum()


class _ExactAuxiliary:
    """Frozen exact denoiser of ``q = N(mu0, s0^2 I)``."""

    def __init__(self, mu0, s0):
        self.mu0, self.s0 = mu0, s0

    def denoiser(self, x, sigma):
        shrink = self.s0**2 / (self.s0**2 + sigma.reshape(-1, 1) ** 2)
        return (self.mu0 + shrink * (x.reshape(x.shape[0], -1) - self.mu0)).reshape(x.shape)


def _gradient_with_error(prior, mu0, s0, first_network_only):
    """Mean gradient over batches and its standard error from the spread between batches."""
    generator = torch.Generator().manual_seed(1)
    batches = 20
    grads = []
    for _ in range(batches):
        mu, s = mu0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        n = N_DRAWS // batches
        z = torch.randn(n, 1, 1, DIM, generator=generator, dtype=torch.float64)
        eps = torch.randn(n, 1, 1, DIM, generator=generator, dtype=torch.float64)
        sigma = torch.full((n,), SIGMA, dtype=torch.float64)
        surrogate = ppm_surrogate(mu.reshape(1, 1, 1, DIM) + s * z, sigma, eps, prior, _ExactAuxiliary(mu0, s0), first_network_only=first_network_only)
        g_mu, g_s = torch.autograd.grad(surrogate.mean(), [mu, s])
        grads.append(torch.cat([g_mu, g_s.reshape(1)]))
    grads = torch.stack(grads)
    return grads.mean(0), grads.std(0) / batches**0.5


def _closed_form_gradient(prior, mu0, s0):
    mu, s = mu0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
    g_mu, g_s = torch.autograd.grad(_closed_form_fisher(prior, mu, s), [mu, s])
    return torch.cat([g_mu, g_s.reshape(1)])


def test_surrogate_gradient_matches_closed_form():
    prior, mu0, s0 = _problem()
    expected = _closed_form_gradient(prior, mu0, s0)
    estimate, standard_error = _gradient_with_error(prior, mu0, s0, first_network_only=False)
    # Five standard errors of the batch means: a false alarm has probability below 1e-5 per entry.
    assert torch.all((estimate - expected).abs() <= 5 * standard_error), (estimate, expected, standard_error)


def test_first_network_only_biased_in_scale():
    prior, mu0, s0 = _problem()
    expected = _closed_form_gradient(prior, mu0, s0)
    estimate, standard_error = _gradient_with_error(prior, mu0, s0, first_network_only=True)
    # The mean gradient is still right; the scale gradient is not.
    assert torch.all((estimate[:DIM] - expected[:DIM]).abs() <= 5 * standard_error[:DIM])
    assert (estimate[DIM] - expected[DIM]).abs() > 20 * standard_error[DIM]
    assert estimate[DIM].abs() < 0.5 * expected[DIM].abs()
