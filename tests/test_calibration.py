"""Calibration of the learned auxiliary, direction by direction, against exact Gaussian posteriors."""

import math

import pytest
import torch

from ppm_core import reconstruct
from ppm_core.inference.auxiliary import LikelihoodFeature, NetworkAuxiliary, ResidualAuxiliary, auxiliary_fit
from ppm_core.inference.common import LogUniformSigma
from ppm_core.metrics import band_spread_ratios
from ppm_core.operators import Downsampling
from ppm_core.problems import gaussian_field_problem, masked_blur_problem, operator_matrix, stationary_field_covariance


@pytest.fixture(scope="module")
def field():
    return gaussian_field_problem()


def test_field_posterior_matches_information_form(field):
    # Independent route: posterior precision = prior precision + A^T A / noise^2.
    matrix = operator_matrix(field.operator)
    prior_cov = field.prior.cov.double()
    precision = torch.linalg.inv(prior_cov) + matrix.T @ matrix / 0.05**2
    cov = torch.linalg.inv(precision)
    mean = cov @ (matrix.T @ field.y.double().reshape(-1)) / 0.05**2
    torch.testing.assert_close(field.posterior.cov, cov, rtol=0, atol=1e-6)
    torch.testing.assert_close(field.posterior.mean.reshape(-1), mean, rtol=0, atol=1e-5)


def test_field_covariance_is_stationary_with_unit_variance():
    cov = stationary_field_covariance(8, correlation=2.0, power=2.0)
    torch.testing.assert_close(cov.diagonal(), torch.ones(64, dtype=torch.float64))
    # Shifting both pixels by the same offset (periodically) keeps the covariance.
    grid = cov.reshape(8, 8, 8, 8)
    torch.testing.assert_close(grid[0, 0, 2, 3], grid[5, 1, 7, 4])


def test_masked_blur_matrix_is_adjoint_of_operator():
    problem = masked_blur_problem(size=16)
    matrix = operator_matrix(problem.operator)
    y = torch.randn(3, *problem.operator.out_shape, generator=torch.Generator().manual_seed(0))
    adjoint = problem.operator.double().A_adjoint(y.double()).reshape(3, -1)
    torch.testing.assert_close(adjoint, y.double().reshape(3, -1) @ matrix, rtol=0, atol=1e-10)


def test_band_ratios_of_exact_draws_are_one(field):
    draws = field.exact_samples(4000)
    ratios = band_spread_ratios(draws, field.posterior.cov, 8)
    # 4000 draws: each direction's std has relative standard error 1/sqrt(8000), about 1.1%.
    assert all(abs(r - 1) < 0.05 for r in ratios), ratios


def test_band_ratios_see_a_collapse_that_pixels_hide(field):
    draws = field.exact_samples(4000).reshape(4000, -1).double()
    _, vectors = torch.linalg.eigh(field.posterior.cov)
    centred = draws - draws.mean(0)
    coords = centred @ vectors
    coords[:, :32] *= 0.25  # collapse the 32 most constrained directions
    ratios = band_spread_ratios(coords @ vectors.T, field.posterior.cov, 8)
    assert abs(ratios[0] - 0.25) < 0.02 and all(abs(r - 1) < 0.05 for r in ratios[1:])


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"bands": 0}, "bands"),
        ({"bands": 2.5}, "bands"),
        ({"posterior_cov": torch.eye(3)}, "posterior_cov"),
        ({"posterior_cov": -torch.eye(256, dtype=torch.float64)}, "positive semi-definite"),
        ({"samples": torch.full((8, 1, 16, 16), float("nan"))}, "NaN"),
    ],
)
def test_band_ratios_reject_bad_input(field, bad, match):
    kwargs = {"samples": field.exact_samples(8), "posterior_cov": field.posterior.cov, "bands": 8} | bad
    with pytest.raises(ValueError, match=match):
        band_spread_ratios(**kwargs)


def test_band_ratios_count_when_bands_do_not_divide():
    samples = torch.randn(50, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for bands in (3, 4, 6, 7, 8):
        assert len(band_spread_ratios(samples, torch.eye(10, dtype=torch.float64), bands)) == bands


@pytest.mark.parametrize(("options", "error"), [({"aux_feature": "yes"}, TypeError), ({"aux": "kde", "aux_feature": True}, ValueError)])
def test_aux_feature_rejects_bad_settings(field, options, error):
    with pytest.raises(error, match="aux_feature"):
        reconstruct(field.y, field.operator, field.prior, n_samples=2, steps=1, **options)


def test_likelihood_feature_needs_differentiable_nll(field):
    class Detached(Downsampling):
        def nll(self, x, y):
            return super().nll(x.detach(), y)

    operator = Detached(2, (1, 16, 16), noise_std=0.05)
    with pytest.raises(ValueError, match="aux_feature=False"):
        reconstruct(field.y, operator, field.prior, n_samples=2, steps=1)


def test_likelihood_feature_is_the_scaled_likelihood_score():
    operator = Downsampling(2, (1, 8, 8), noise_std=0.1).double()
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(1, 1, 4, 4, generator=generator, dtype=torch.float64)
    x = torch.randn(3, 1, 8, 8, generator=generator, dtype=torch.float64)
    curvature = LikelihoodFeature.estimate_curvature(operator, y, x, iterations=50)
    # A A^T = I / 4, so the nll's Hessian A^T A / noise^2 has largest eigenvalue 1 / (4 * 0.01).
    assert curvature == pytest.approx(25.0, rel=1e-6)
    sigma = torch.tensor([0.05, 0.5, 5.0], dtype=torch.float64)
    feature = LikelihoodFeature(operator, y, curvature)(x, sigma)
    score = operator.A_adjoint(y - operator.A(x)) / 0.1**2
    expected = sigma.reshape(-1, 1, 1, 1) * score / (1 + sigma.reshape(-1, 1, 1, 1) ** 2 * 25.0)
    torch.testing.assert_close(feature, expected)


def test_auxiliary_fit_is_one_for_an_untrained_auxiliary(field):
    proposal = LogUniformSigma(0.01, 20.0)
    feature = LikelihoodFeature(field.operator, field.y, 100.0)
    aux = ResidualAuxiliary(field.prior, (1, 16, 16), proposal, feature=feature)
    fit = auxiliary_fit(aux, field.prior, field.exact_samples(16).float(), proposal, torch.Generator().manual_seed(0))
    # The residual starts at zero, so the auxiliary is the prior.
    assert len(fit) == 4 and all(v == pytest.approx(1.0, abs=1e-6) for v in fit.values())


def test_network_auxiliary_with_feature_starts_at_prior():
    from ppm_core.priors import DiffusionPrior, UNetConfig

    torch.manual_seed(0)
    prior = DiffusionPrior(UNetConfig(base_channels=8, channel_mults=[1, 2], blocks_per_level=1, embedding_dim=32), sigma_data=0.5)
    torch.nn.init.normal_(prior.net.conv_out.weight, std=0.05)
    prior = prior.eval().requires_grad_(False)
    operator = Downsampling(2, (1, 16, 16), noise_std=0.1)
    y = operator.simulate(torch.zeros(1, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    aux = NetworkAuxiliary(prior, LogUniformSigma(), steps=2, lr=1e-2, rank=2, feature=LikelihoodFeature(operator, y, 25.0), event_shape=(1, 16, 16))
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.1, 1.0, 5.0])
    torch.testing.assert_close(aux.denoiser(x, sigma), prior.denoiser(x, sigma), rtol=1e-5, atol=1e-6)
    aux.fit(torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2)), torch.Generator().manual_seed(3))
    assert not torch.allclose(aux.denoiser(x, sigma), prior.denoiser(x, sigma))


def test_default_learned_auxiliary_is_calibrated_in_every_band(field):
    """64 particles with default settings keep every band within 0.8-1.25 of the exact spread.

    ``benchmarks/calibration.py`` reports the exact figures. The bound is loose because the band
    medians of 64 particles carry sampling noise (64 exact draws give 0.97-1.03 on this problem).
    """
    posterior = reconstruct(field.y, field.operator, field.prior, method="ppm", n_samples=64, seed=0)
    assert posterior.options["aux"] == "residual"
    assert posterior.options["aux_feature"] is True
    ratios = band_spread_ratios(posterior.samples, field.posterior.cov, 8)
    assert all(0.8 <= r <= 1.25 for r in ratios), ratios
    # The auxiliary has learned the particles at the noise levels of the posterior's width.
    fit = posterior.diagnostics["auxiliary fit"]
    assert min(fit.values()) < 0.9, fit
    assert not math.isnan(sum(fit.values()))
