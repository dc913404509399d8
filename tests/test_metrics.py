"""Calibration and distance metrics against values known in closed form."""

import math

import pytest
import torch

from ppm_core.metrics import diversity, interval_coverage, psnr, sliced_wasserstein


def test_coverage_of_exact_samples():
    generator = torch.Generator().manual_seed(0)
    samples = torch.randn(4000, 1, 1, 8, generator=generator, dtype=torch.float64)
    truths = torch.randn(2000, 1, 1, 8, generator=generator, dtype=torch.float64)
    coverage = interval_coverage(samples, truths, 0.9)
    # 16000 Bernoulli(0.9) outcomes: standard error 0.0024, plus the quantile estimates' error.
    assert abs(coverage - 0.9) < 0.02


def test_coverage_of_collapsed_samples():
    samples = torch.zeros(100, 1, 1, 4, dtype=torch.float64)
    truths = torch.ones(10, 1, 1, 4, dtype=torch.float64)
    assert interval_coverage(samples, truths) == 0.0


def test_coverage_rejects_bad_level():
    with pytest.raises(ValueError, match="level must be in"):
        interval_coverage(torch.zeros(3, 1, 1, 2), torch.zeros(1, 1, 2), 1.5)


def test_sliced_wasserstein_of_shift():
    # Shifting a set by t moves every 1-D projection by <t, u>; E <t, u>^2 = |t|^2 / d over unit u.
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(500, 1, 1, 4, generator=generator, dtype=torch.float64)
    shift = torch.tensor([2.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    distance = sliced_wasserstein(a, a + shift, n_projections=4000)
    assert distance == pytest.approx(2.0 / math.sqrt(4), rel=0.05)
    assert sliced_wasserstein(a, a) == 0.0


def test_psnr_of_known_error():
    reference = torch.tensor([0.0, 1.0, 0.0, 1.0])
    estimate = reference + 0.1
    assert psnr(estimate, reference) == pytest.approx(20.0, abs=1e-4)


def test_diversity_extremes():
    parallel = torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    orthogonal = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    assert diversity(parallel) == pytest.approx(0.0, abs=1e-12)
    assert diversity(orthogonal) == pytest.approx(1.0)
    assert diversity(parallel[:1]) == 0.0
