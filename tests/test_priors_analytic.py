"""Analytic priors checked against independent Monte-Carlo and closed-form results, and the EDM sampler on a Gaussian."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from ppm_core.priors import GaussianMixturePrior, GaussianPrior, as_sigma
from ppm_core.sampling import edm_sampler, karras_sigmas

DTYPE = torch.float64


def _vectors(rows) -> torch.Tensor:
    """Return a list of d-vectors as a ``(batch, 1, 1, d)`` float64 tensor."""
    x = torch.as_tensor(rows, dtype=DTYPE)
    return x.reshape(x.shape[0], 1, 1, -1)


def _random_spd(d: int, generator: torch.Generator) -> torch.Tensor:
    """Return a well-conditioned random symmetric positive-definite ``(d, d)`` matrix."""
    factor = torch.randn(d, d, generator=generator, dtype=DTYPE)
    return factor @ factor.T / d + 0.5 * torch.eye(d, dtype=DTYPE)


def _importance_posterior(x0: torch.Tensor, queries: torch.Tensor, sigma: float):
    """Estimate ``E[x0 | x0 + sigma eps = x]`` by self-normalized importance weighting of prior draws.

    Each prior draw ``x0_i`` gets the weight ``w_i = N(x; x0_i, sigma^2 I)``.

    Returns
    -------
    mean, var : (Q, d) tensors
        Weighted posterior mean and per-coordinate posterior variance at each query point.
    ess : (Q,) tensor
        Effective sample size ``(sum w)^2 / sum w^2`` of each query point.
    weights : (Q, M) tensor
        Normalized weights.
    """
    log_w = -((queries[:, None, :] - x0[None, :, :]) ** 2).sum(-1) / (2 * sigma**2)
    weights = torch.softmax(log_w, dim=-1)
    mean = weights @ x0
    var = (weights[..., None] * (x0[None] - mean[:, None]) ** 2).sum(1)
    ess = 1 / (weights**2).sum(-1)
    return mean, var, ess, weights


# ------------------------------------------------------------------------------------------------
# Denoisers against Monte-Carlo posterior means


def test_gaussian_denoiser_matches_monte_carlo():
    generator = torch.Generator().manual_seed(1)
    mean = torch.tensor([0.5, -1.0, 0.2], dtype=DTYPE)
    cov = torch.tensor([[1.0, 0.6, 0.1], [0.6, 0.8, -0.2], [0.1, -0.2, 0.5]], dtype=DTYPE)
    prior = GaussianPrior(mean, cov)
    sigma = 0.8

    # Prior draws through a Cholesky factor, independent of GaussianPrior.sample.
    n_draws = 200_000
    chol = torch.linalg.cholesky(cov)
    x0 = mean + torch.randn(n_draws, 3, generator=generator, dtype=DTYPE) @ chol.T
    queries = torch.tensor([[0.5, -1.0, 0.2], [1.5, -0.2, 0.0], [-0.4, -1.8, 0.9]], dtype=DTYPE)
    mc_mean, mc_var, ess, _ = _importance_posterior(x0, queries, sigma)

    # Self-normalized importance sampling has standard error about sqrt(posterior var / ESS).
    assert bool(torch.all(ess > 10_000)), f"effective sample sizes too small for the tolerance: {ess.tolist()}"
    tolerance = 5 * torch.sqrt(mc_var / ess[:, None])
    denoised = prior.denoiser(_vectors(queries), sigma).reshape(3, 3)
    error = (denoised - mc_mean).abs()
    assert bool(torch.all(error < tolerance)), f"error {error.tolist()} exceeds 5 standard errors {tolerance.tolist()}"


def _bimodal_mixture() -> GaussianMixturePrior:
    weights = torch.tensor([0.3, 0.7], dtype=DTYPE)
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.5]], dtype=DTYPE)
    covs = torch.tensor([[[0.5, 0.0], [0.0, 0.5]], [[0.6, 0.2], [0.2, 0.4]]], dtype=DTYPE)
    return GaussianMixturePrior(weights, means, covs)


def test_mixture_denoiser_matches_monte_carlo():
    generator = torch.Generator().manual_seed(2)
    prior = _bimodal_mixture()
    sigma = 1.0

    # Prior draws: component labels, then a Cholesky draw from each component.
    n_draws = 200_000
    labels = torch.multinomial(prior.weights, n_draws, replacement=True, generator=generator)
    means = torch.stack([c.mean for c in prior.components])
    chols = torch.linalg.cholesky(torch.stack([c.cov for c in prior.components]))
    z = torch.randn(n_draws, 2, generator=generator, dtype=DTYPE)
    x0 = means[labels] + torch.einsum("nij,nj->ni", chols[labels], z)

    # Query points between the modes, where both components contribute, and near each mode.
    queries = torch.tensor([[0.3, 0.2], [-0.5, 0.0], [-2.0, 0.2], [2.2, 0.6]], dtype=DTYPE)
    mc_mean, mc_var, ess, weights = _importance_posterior(x0, queries, sigma)
    assert bool(torch.all(ess > 10_000)), f"effective sample sizes too small for the tolerance: {ess.tolist()}"

    tolerance = 5 * torch.sqrt(mc_var / ess[:, None])
    denoised = prior.denoiser(_vectors(queries), sigma).reshape(4, 2)
    error = (denoised - mc_mean).abs()
    assert bool(torch.all(error < tolerance)), f"error {error.tolist()} exceeds 5 standard errors {tolerance.tolist()}"

    # The weight carried by draws of component 0 estimates its responsibility; a weighted
    # Bernoulli mean has standard error sqrt(r (1 - r) / ESS).
    mc_r0 = weights[:, labels == 0].sum(-1)
    r0 = prior.responsibilities(_vectors(queries), sigma)[:, 0]
    tolerance_r = 5 * torch.sqrt(mc_r0 * (1 - mc_r0) / ess) + 1e-12
    assert bool(torch.all((r0 - mc_r0).abs() < tolerance_r)), f"responsibilities {r0.tolist()} vs Monte Carlo {mc_r0.tolist()}"
    assert 0.05 < float(r0[0]) < 0.95, "the first query point should sit between the modes"


def test_mixture_responsibilities_sum_to_one():
    prior = _bimodal_mixture()
    x = _vectors([[0.0, 0.0], [-3.0, 1.0], [40.0, -40.0]])
    r = prior.responsibilities(x, torch.tensor([0.1, 1.0, 5.0], dtype=DTYPE))
    assert r.shape == (3, 2)
    torch.testing.assert_close(r.sum(-1), torch.ones(3, dtype=DTYPE), rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# Score, log-density and sampling


@pytest.mark.parametrize("prior_name", ["gaussian", "mixture"])
@pytest.mark.parametrize("sigma", [0.05, 0.7, 10.0])
def test_score_equals_log_prob_gradient(prior_name, sigma):
    generator = torch.Generator().manual_seed(3)
    if prior_name == "gaussian":
        prior = GaussianPrior(torch.tensor([0.3, -0.2, 1.0], dtype=DTYPE), _random_spd(3, generator))
        x = torch.randn(5, 1, 1, 3, generator=generator, dtype=DTYPE)
    else:
        prior = _bimodal_mixture()
        x = 2 * torch.randn(5, 1, 1, 2, generator=generator, dtype=DTYPE)
    x.requires_grad_(True)

    (gradient,) = torch.autograd.grad(prior.log_prob(x, sigma).sum(), x)
    score = prior.score(x.detach(), sigma)
    torch.testing.assert_close(score, gradient, rtol=1e-9, atol=1e-12)


def test_gaussian_log_prob_matches_scipy():
    generator = torch.Generator().manual_seed(4)
    mean = torch.tensor([0.3, -0.2, 1.0], dtype=DTYPE)
    cov = _random_spd(3, generator)
    prior = GaussianPrior(mean, cov)
    x = torch.randn(6, 3, generator=generator, dtype=DTYPE)
    sigma = 0.4

    expected = multivariate_normal(mean.numpy(), (cov + sigma**2 * torch.eye(3, dtype=DTYPE)).numpy()).logpdf(x.numpy())
    actual = prior.log_prob(_vectors(x), sigma)
    np.testing.assert_allclose(actual.numpy(), expected, rtol=1e-12)
    expected_clean = multivariate_normal(mean.numpy(), cov.numpy()).logpdf(x.numpy())
    np.testing.assert_allclose(prior.log_prob(_vectors(x)).numpy(), expected_clean, rtol=1e-12)


def test_sample_moments_match_parameters():
    generator = torch.Generator().manual_seed(5)
    n = 100_000

    # Gaussian: mean within 5 standard errors sqrt(var / n), covariance entries within
    # 5 * sqrt((C_jj C_kk + C_jk^2) / n), the standard error of a sample covariance.
    mean = torch.tensor([0.3, -0.2, 1.0], dtype=DTYPE)
    cov = _random_spd(3, generator)
    samples = GaussianPrior(mean, cov).sample(n, generator=generator)
    assert samples.shape == (n, 1, 1, 3)
    flat = samples.reshape(n, 3)
    var = torch.diagonal(cov)
    assert bool(torch.all((flat.mean(0) - mean).abs() < 5 * torch.sqrt(var / n)))
    cov_tolerance = 5 * torch.sqrt((var[:, None] * var[None, :] + cov**2) / n)
    assert bool(torch.all((torch.cov(flat.T) - cov).abs() < cov_tolerance))

    # Mixture: the same bounds with the mixture's mean and covariance.
    prior = _bimodal_mixture()
    flat = prior.sample(n, generator=generator).reshape(n, 2)
    component_means = torch.stack([c.mean for c in prior.components])
    mixture_mean = prior.weights @ component_means
    centred = component_means - mixture_mean
    mixture_cov = sum(
        w * (c.cov + torch.outer(m, m)) for w, c, m in zip(prior.weights, prior.components, centred)
    )
    var = torch.diagonal(mixture_cov)
    assert bool(torch.all((flat.mean(0) - mixture_mean).abs() < 5 * torch.sqrt(var / n)))
    # A mixture has heavier fourth moments than a Gaussian, so the covariance bound is doubled.
    cov_tolerance = 10 * torch.sqrt((var[:, None] * var[None, :] + mixture_cov**2) / n)
    assert bool(torch.all((torch.cov(flat.T) - mixture_cov).abs() < cov_tolerance))


# ------------------------------------------------------------------------------------------------
# sigma as a float or a per-item tensor


@pytest.mark.parametrize("prior_name", ["gaussian", "mixture"])
def test_sigma_float_equals_batch_tensor(prior_name):
    generator = torch.Generator().manual_seed(6)
    prior = GaussianPrior(torch.zeros(3, dtype=DTYPE), _random_spd(3, generator)) if prior_name == "gaussian" else _bimodal_mixture()
    d = prior.event_shape[-1]
    x = torch.randn(4, 1, 1, d, generator=generator, dtype=DTYPE)

    assert torch.equal(prior.denoiser(x, 0.5), prior.denoiser(x, torch.full((4,), 0.5, dtype=DTYPE)))
    assert torch.equal(prior.score(x, 0.5), prior.score(x, torch.full((4,), 0.5, dtype=DTYPE)))


@pytest.mark.parametrize("prior_name", ["gaussian", "mixture"])
def test_sigma_per_item(prior_name):
    generator = torch.Generator().manual_seed(7)
    prior = GaussianPrior(torch.zeros(3, dtype=DTYPE), _random_spd(3, generator)) if prior_name == "gaussian" else _bimodal_mixture()
    d = prior.event_shape[-1]
    x = torch.randn(4, 1, 1, d, generator=generator, dtype=DTYPE)
    sigmas = torch.tensor([0.01, 0.3, 2.0, 50.0], dtype=DTYPE)

    batched = prior.denoiser(x, sigmas)
    for i in range(4):
        single = prior.denoiser(x[i : i + 1], float(sigmas[i]))
        torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-12, atol=1e-14)


def test_as_sigma_shapes():
    x = torch.zeros(3, 1, 4, 4)
    assert as_sigma(0.5, x).shape == (3, 1, 1, 1)
    assert as_sigma(torch.tensor([0.1, 0.2, 0.3]), x).shape == (3, 1, 1, 1)
    assert as_sigma(0.5, x).dtype == x.dtype


# ------------------------------------------------------------------------------------------------
# Exact Gaussian posterior


def _information_form(mean, cov, matrix, noise_std, y):
    """Return the textbook posterior ``S = (C^-1 + A^T A / s^2)^-1``, ``m = S (C^-1 mu + A^T y / s^2)``."""
    precision = torch.linalg.inv(cov) + matrix.T @ matrix / noise_std**2
    post_cov = torch.linalg.inv(precision)
    post_mean = post_cov @ (torch.linalg.solve(cov, mean) + matrix.T @ y / noise_std**2)
    return post_mean, post_cov


def test_posterior_matches_information_form():
    generator = torch.Generator().manual_seed(8)
    mean = torch.tensor([0.3, -0.2, 1.0], dtype=DTYPE)
    cov = _random_spd(3, generator)
    matrix = torch.randn(4, 3, generator=generator, dtype=DTYPE)
    y = torch.randn(4, generator=generator, dtype=DTYPE)
    noise_std = 0.3

    posterior = GaussianPrior(mean, cov).posterior(matrix, noise_std, y)
    expected_mean, expected_cov = _information_form(mean, cov, matrix, noise_std, y)
    torch.testing.assert_close(posterior.mean, expected_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(posterior.cov, expected_cov, rtol=1e-10, atol=1e-12)


def test_posterior_rank_deficient_matrix():
    generator = torch.Generator().manual_seed(9)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=DTYPE))
    eigenvalues = torch.tensor([1.5, 0.7, 0.4], dtype=DTYPE)
    cov = q @ torch.diag(eigenvalues) @ q.T
    mean = torch.tensor([0.3, -0.2, 1.0], dtype=DTYPE)

    # A rank-2 matrix (third row = first + second) whose null space is the eigenvector q[:, 2].
    reduced = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 0.0], [1.5, 1.0, 0.0]], dtype=DTYPE)
    matrix = reduced @ q.T
    assert int(torch.linalg.matrix_rank(matrix)) == 2
    null_vector = q[:, 2]
    y = torch.tensor([0.4, -0.1, 0.3], dtype=DTYPE)
    noise_std = 0.2

    posterior = GaussianPrior(mean, cov).posterior(matrix, noise_std, y)
    expected_mean, expected_cov = _information_form(mean, cov, matrix, noise_std, y)
    torch.testing.assert_close(posterior.mean, expected_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(posterior.cov, expected_cov, rtol=1e-10, atol=1e-12)

    # The measurement carries no information along the null space, so the prior variance and mean remain there.
    torch.testing.assert_close(posterior.cov @ null_vector, eigenvalues[2] * null_vector, rtol=0, atol=1e-12)
    torch.testing.assert_close(null_vector @ posterior.mean, null_vector @ mean, rtol=0, atol=1e-12)


def test_posterior_singular_prior_cov():
    generator = torch.Generator().manual_seed(10)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=DTYPE))
    range_basis = q[:, :2]
    cov = range_basis @ torch.diag(torch.tensor([1.2, 0.5], dtype=DTYPE)) @ range_basis.T
    mean = torch.tensor([0.3, -0.2, 1.0], dtype=DTYPE)
    matrix = torch.randn(2, 3, generator=generator, dtype=DTYPE)
    y = torch.randn(2, generator=generator, dtype=DTYPE)
    noise_std = 0.3

    posterior = GaussianPrior(mean, cov).posterior(matrix, noise_std, y)

    # The prior lives on mean + range(cov); solve the full-rank problem in those 2 coordinates.
    reduced_mean, reduced_cov = _information_form(
        torch.zeros(2, dtype=DTYPE),
        range_basis.T @ cov @ range_basis,
        matrix @ range_basis,
        noise_std,
        y - matrix @ mean,
    )
    torch.testing.assert_close(posterior.mean, mean + range_basis @ reduced_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(posterior.cov, range_basis @ reduced_cov @ range_basis.T, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# EDM sampler on a Gaussian prior


def test_edm_sampler_gaussian_moments():
    generator = torch.Generator().manual_seed(11)
    d, n = 4, 4000
    mean = torch.tensor([0.5, -0.3, 0.2, 0.1], dtype=DTYPE)
    cov = _random_spd(d, generator)
    prior = GaussianPrior(mean, cov)

    samples = edm_sampler(prior, (n, 1, 1, d), steps=64, sigma_max=80.0, generator=generator)
    assert samples.shape == (n, 1, 1, d)
    assert samples.dtype == DTYPE
    flat = samples.reshape(n, d)

    # On a Gaussian prior each Heun step is an affine map, so the sampler's bias can be computed
    # exactly per eigenvalue. With 64 steps and sigma_max = 80 the output standard deviation is
    # off by less than 0.5%, and less than 2% of the mean remains as an offset toward 0 because
    # sampling starts from N(0, sigma_max^2 I). Both biases are far below the tolerances: the mean
    # within 5 * sqrt(C_jj / n) and covariance entries within 5 * sqrt((C_jj C_kk + C_jk^2) / n).
    var = torch.diagonal(cov)
    mean_error = (flat.mean(0) - mean).abs()
    mean_tolerance = 5 * torch.sqrt(var / n)
    assert bool(torch.all(mean_error < mean_tolerance)), f"mean error {mean_error.tolist()} > {mean_tolerance.tolist()}"
    cov_error = (torch.cov(flat.T) - cov).abs()
    cov_tolerance = 5 * torch.sqrt((var[:, None] * var[None, :] + cov**2) / n)
    assert bool(torch.all(cov_error < cov_tolerance)), f"covariance error {cov_error.tolist()} > {cov_tolerance.tolist()}"


def test_karras_sigmas_endpoints():
    sigmas = karras_sigmas(10, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert sigmas.shape == (11,)
    assert float(sigmas[0]) == pytest.approx(80.0, rel=1e-12)
    assert float(sigmas[-2]) == pytest.approx(0.002, rel=1e-12)
    assert float(sigmas[-1]) == 0.0
    assert bool(torch.all(sigmas[:-1] > sigmas[1:]))
    # Karras et al. (2022), eq. 5: sigma_i^(1/rho) is evenly spaced.
    roots = sigmas[:-1] ** (1 / 7.0)
    torch.testing.assert_close(roots.diff(), torch.full((9,), float(roots.diff()[0]), dtype=DTYPE), rtol=1e-10, atol=0)


# ------------------------------------------------------------------------------------------------
# Input validation


def _gaussian_2d() -> GaussianPrior:
    return GaussianPrior(torch.zeros(2, dtype=DTYPE), torch.eye(2, dtype=DTYPE))


INVALID_CONSTRUCTIONS = [
    ("mean 4-D", lambda: GaussianPrior(torch.zeros(2, 2, 2, 2), torch.eye(16)), ValueError, r"mean must have shape"),
    ("mean integer", lambda: GaussianPrior(torch.tensor([0, 1]), torch.eye(2)), TypeError, r"mean must have a floating dtype"),
    ("cov wrong size", lambda: GaussianPrior(torch.zeros(2), torch.eye(3)), ValueError, r"cov must have shape \(2, 2\)"),
    ("cov not symmetric", lambda: GaussianPrior(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]])), ValueError, r"cov must be symmetric"),
    ("cov not PSD", lambda: GaussianPrior(torch.zeros(2), torch.tensor([[1.0, 2.0], [2.0, 1.0]])), ValueError, r"cov must be positive semi-definite"),
    ("cov NaN", lambda: GaussianPrior(torch.zeros(2), torch.tensor([[1.0, math.nan], [math.nan, 1.0]])), ValueError, r"cov contains NaN"),
    ("weights negative", lambda: GaussianMixturePrior(torch.tensor([1.0, -1.0]), torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2)), ValueError, r"weights must be non-negative"),
    ("weights wrong count", lambda: GaussianMixturePrior(torch.tensor([1.0, 1.0, 1.0]), torch.zeros(2, 2), torch.eye(2).expand(2, 2, 2)), ValueError, r"weights must have shape \(2,\)"),
    ("means 1-D", lambda: GaussianMixturePrior(torch.tensor([1.0, 1.0]), torch.zeros(2), torch.eye(2)), ValueError, r"means must have shape \(K, d\)"),
    ("means integer", lambda: GaussianMixturePrior(torch.tensor([1, 1]), torch.zeros(2, 2, dtype=torch.long), torch.eye(2).expand(2, 2, 2)), TypeError, r"means must have a floating dtype"),
    ("covs wrong shape", lambda: GaussianMixturePrior(torch.tensor([1.0, 1.0]), torch.zeros(2, 2), torch.eye(2).expand(3, 2, 2)), ValueError, r"covs must have shape \(2, 2, 2\)"),
    ("component cov not PSD", lambda: GaussianMixturePrior(torch.tensor([1.0, 1.0]), torch.zeros(2, 2), torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [2.0, 1.0]]])), ValueError, r"cov must be positive semi-definite"),
]


@pytest.mark.parametrize("build, error, match", [case[1:] for case in INVALID_CONSTRUCTIONS], ids=[case[0] for case in INVALID_CONSTRUCTIONS])
def test_invalid_construction_raises(build, error, match):
    with pytest.raises(error, match=match):
        build()


INVALID_CALLS = [
    ("x integer", torch.zeros(3, 1, 1, 2, dtype=torch.long), 1.0, TypeError, r"x must have a floating dtype"),
    ("x not a tensor", np.zeros((3, 1, 1, 2)), 1.0, TypeError, r"x must be a torch.Tensor"),
    ("x 2-D", torch.zeros(3, 2, dtype=DTYPE), 1.0, ValueError, r"x must have shape \(batch, C, H, W\)"),
    ("x wrong d", torch.zeros(3, 1, 1, 3, dtype=DTYPE), 1.0, ValueError, r"x must have shape \(batch, 1, 1, 2\)"),
    ("sigma zero", torch.zeros(3, 1, 1, 2, dtype=DTYPE), 0.0, ValueError, r"sigma must be positive"),
    ("sigma negative", torch.zeros(3, 1, 1, 2, dtype=DTYPE), -1.0, ValueError, r"sigma must be positive"),
    ("sigma NaN", torch.zeros(3, 1, 1, 2, dtype=DTYPE), math.nan, ValueError, r"sigma must be positive"),
    ("sigma one item zero", torch.zeros(3, 1, 1, 2, dtype=DTYPE), torch.tensor([1.0, 0.0, 1.0]), ValueError, r"sigma must be positive"),
    ("sigma wrong batch", torch.zeros(3, 1, 1, 2, dtype=DTYPE), torch.ones(2), ValueError, r"sigma must be a float or a \(batch,\) tensor with batch=3"),
]


@pytest.mark.parametrize("method", ["denoiser", "score"])
@pytest.mark.parametrize("x, sigma, error, match", [case[1:] for case in INVALID_CALLS], ids=[case[0] for case in INVALID_CALLS])
def test_invalid_call_raises(method, x, sigma, error, match):
    for prior in (_gaussian_2d(), _bimodal_mixture()):
        with pytest.raises(error, match=match):
            getattr(prior, method)(x, sigma)


def test_posterior_invalid_shapes_raise():
    prior = _gaussian_2d()
    with pytest.raises(ValueError, match=r"matrix must have shape \(m, 2\)"):
        prior.posterior(torch.ones(3, 3, dtype=DTYPE), 0.1, torch.ones(3, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"y must have 3 entries"):
        prior.posterior(torch.ones(3, 2, dtype=DTYPE), 0.1, torch.ones(4, dtype=DTYPE))
