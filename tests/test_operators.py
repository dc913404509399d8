"""Tests of the forward models and noise models in ppm_core.operators."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d

from ppm_core.operators import (
    ComposedOperator,
    Convolution,
    Downsampling,
    GaussianNoise,
    Inpainting,
    LinearOperator,
    MatrixOperator,
    PoissonGaussianNoise,
    anscombe,
)

DTYPE = torch.float64


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    return torch.randn(shape, generator=_generator(seed), dtype=dtype)


# Builders of every linear operator, each returning a fresh operator in float64.
LINEAR_OPERATORS = {
    "matrix_rank_deficient": lambda: MatrixOperator(_randn(8, 3, seed=1) @ _randn(3, 6, seed=2)),
    "inpainting_3d_mask": lambda: Inpainting(torch.rand(3, 9, 11, generator=_generator(3)) > 0.4),
    "inpainting_2d_mask_2_channels": lambda: Inpainting(
        torch.rand(9, 11, generator=_generator(4)) > 0.4, in_shape=(2, 9, 11)
    ),
    "convolution_odd_psf_odd_image": lambda: Convolution(_randn(5, 3, seed=5), (2, 17, 13)),
    "convolution_even_psf_odd_image": lambda: Convolution(_randn(4, 6, seed=6), (1, 15, 11)),
    "convolution_per_channel_psf": lambda: Convolution(_randn(3, 4, 5, seed=7), (3, 12, 10)),
    "convolution_psf_larger_than_image": lambda: Convolution(_randn(21, 18, seed=8), (1, 8, 7)),
    "downsampling_2": lambda: Downsampling(2, (2, 16, 12)),
    "downsampling_3": lambda: Downsampling(3, (1, 9, 15)),
    "composed_blur_then_downsample": lambda: ComposedOperator(
        Convolution(_randn(6, 5, seed=9), (1, 16, 20)), Downsampling(2, (1, 16, 20))
    ),
}


@pytest.mark.parametrize("name", LINEAR_OPERATORS)
def test_adjoint_matches_inner_product(name):
    operator = LINEAR_OPERATORS[name]()
    x = _randn(3, *operator.in_shape, seed=10)
    y = _randn(3, *operator.out_shape, seed=11)

    Ax = operator.A(x)
    lhs = (Ax * y).sum()
    rhs = (x * operator.A_adjoint(y)).sum()

    # Scale by the Cauchy-Schwarz bound so that the tolerance is float64 round-off.
    scale = Ax.norm() * y.norm()
    assert Ax.shape == (3, *operator.out_shape)
    assert abs(lhs - rhs) <= 1e-10 * scale


@pytest.mark.parametrize("name", LINEAR_OPERATORS)
def test_autograd_gradient_equals_adjoint(name):
    operator = LINEAR_OPERATORS[name]()
    x = _randn(2, *operator.in_shape, seed=12).requires_grad_(True)
    v = _randn(2, *operator.out_shape, seed=13)

    (operator.A(x) * v).sum().backward()

    torch.testing.assert_close(x.grad, operator.A_adjoint(v), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("psf_shape", [(1, 1), (3, 3), (5, 3), (7, 9)])
@pytest.mark.parametrize("image_shape", [(13, 11), (16, 16)])
def test_convolution_matches_scipy_same_for_odd_psf(psf_shape, image_shape):
    psf = _randn(*psf_shape, seed=20)
    x = _randn(1, 1, *image_shape, seed=21)

    result = Convolution(psf, (1, *image_shape)).A(x)[0, 0]
    expected = convolve2d(x[0, 0].numpy(), psf.numpy(), mode="same", boundary="fill")

    np.testing.assert_allclose(result.numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("psf_shape", [(4, 4), (2, 6), (4, 3)])
def test_convolution_even_psf_crops_full_at_centre(psf_shape):
    h, w = psf_shape
    psf = _randn(h, w, seed=22)
    x = _randn(1, 1, 11, 14, seed=23)

    result = Convolution(psf, (1, 11, 14)).A(x)[0, 0].numpy()
    full = convolve2d(x[0, 0].numpy(), psf.numpy(), mode="full")

    # The output starts at the PSF centre (h // 2, w // 2) of the full convolution. Scipy's
    # "same" starts at ((h - 1) // 2, (w - 1) // 2), one pixel earlier along even axes.
    np.testing.assert_allclose(result, full[h // 2 : h // 2 + 11, w // 2 : w // 2 + 14], rtol=0, atol=1e-12)


def test_convolution_psf_larger_than_image_matches_scipy():
    psf = _randn(23, 19, seed=24)
    x = _randn(1, 1, 9, 6, seed=25)

    result = Convolution(psf, (1, 9, 6)).A(x)[0, 0]
    expected = convolve2d(x[0, 0].numpy(), psf.numpy(), mode="same")

    np.testing.assert_allclose(result.numpy(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("psf_size", [3, 4, 5, 6])
def test_convolution_delta_psf_is_identity(psf_size):
    psf = torch.zeros(psf_size, psf_size, dtype=DTYPE)
    psf[psf_size // 2, psf_size // 2] = 1.0
    x = _randn(2, 3, 10, 7, seed=26)

    torch.testing.assert_close(Convolution(psf, (3, 10, 7)).A(x), x, rtol=0, atol=1e-12)


def test_convolution_has_no_wraparound():
    psf = torch.ones(5, 5, dtype=DTYPE) / 25
    x = torch.zeros(1, 1, 16, 16, dtype=DTYPE)
    x[0, 0, 8, 0] = 1.0

    blurred = Convolution(psf, (1, 16, 16)).A(x)[0, 0]

    # The PSF reaches 2 pixels from the source, so the right half must stay dark.
    assert blurred[:, 3:].abs().max() < 1e-14
    assert blurred[8, 0] == pytest.approx(1 / 25)


def test_convolution_follows_module_dtype():
    operator = Convolution(torch.ones(3, 3, dtype=DTYPE) / 9, (1, 8, 8)).float()
    x = torch.ones(1, 1, 8, 8)

    result = operator.A(x)

    assert operator.psf_fft.dtype == torch.float32
    assert result.dtype == torch.float32
    assert result[0, 0, 4, 4].item() == pytest.approx(1.0, abs=1e-6)


def test_operators_accept_float32():
    operator = ComposedOperator(Convolution(torch.ones(3, 3) / 9, (1, 8, 8)), Downsampling(2, (1, 8, 8)))
    x = torch.rand(2, 1, 8, 8, generator=_generator(27))

    assert operator.A(x).dtype == torch.float32
    assert operator.A_adjoint(operator.A(x)).dtype == torch.float32


def test_downsampling_is_block_mean():
    x = torch.arange(16, dtype=DTYPE).reshape(1, 1, 4, 4)

    result = Downsampling(2, (1, 4, 4)).A(x)

    expected = torch.tensor([[2.5, 4.5], [10.5, 12.5]], dtype=DTYPE)
    torch.testing.assert_close(result[0, 0], expected)


def test_matrix_operator_matches_matmul():
    matrix = _randn(4, 6, seed=30)
    x = _randn(3, 1, 1, 6, seed=31)

    result = MatrixOperator(matrix).A(x)

    torch.testing.assert_close(result[:, 0, 0], x[:, 0, 0] @ matrix.T)


def test_gaussian_nll_closed_form():
    noise_std = 0.3
    operator = MatrixOperator(_randn(5, 4, seed=40), noise_std=noise_std)
    x = _randn(3, 1, 1, 4, seed=41)
    y = _randn(3, 1, 1, 5, seed=42)

    residual = y - operator.A(x)
    expected = 0.5 * (residual**2).flatten(1).sum(1) / noise_std**2
    constant = 0.5 * 5 * math.log(2 * math.pi * noise_std**2)

    torch.testing.assert_close(operator.nll(x, y), expected)
    torch.testing.assert_close(operator.noise.nll_full(y, operator.A(x)), expected + constant)


def test_gaussian_nll_per_channel_noise_std():
    noise_std = torch.tensor([0.1, 0.5], dtype=DTYPE).reshape(1, 2, 1, 1)
    noise = GaussianNoise(noise_std)
    y = _randn(2, 2, 3, 3, seed=43)
    Ax = _randn(2, 2, 3, 3, seed=44)

    expected = (0.5 * ((y - Ax) / noise_std) ** 2).flatten(1).sum(1)

    torch.testing.assert_close(noise.nll(y, Ax), expected)


def test_nll_broadcasts_single_measurement():
    operator = Downsampling(2, (1, 4, 4), noise_std=0.1)
    x = _randn(5, 1, 4, 4, seed=45)
    y = _randn(1, 1, 2, 2, seed=46)

    result = operator.nll(x, y)

    assert result.shape == (5,)
    torch.testing.assert_close(result[3], operator.nll(x[3:4], y)[0])


def test_inpainting_nll_ignores_unobserved_entries():
    mask = torch.tensor([[1, 0], [0, 1]])
    noise = PoissonGaussianNoise(gain=2.0, offset=10.0, read_noise_std=1.0)
    operator = Inpainting(mask, noise=noise)
    x = torch.full((1, 1, 2, 2), 3.0, dtype=DTYPE)
    y = torch.tensor([[[[15.0, 999.0], [-999.0, 17.0]]]], dtype=DTYPE)

    result = operator.nll(x, y)

    # Only the two observed entries count, each with mean 16 and variance 4 * 3 + 1.
    variance = 13.0
    expected = 2 * 0.5 * (1.0 / variance + math.log(variance))
    assert result.item() == pytest.approx(expected, rel=1e-12)


def test_inpainting_simulate_zeroes_unobserved_entries():
    mask = torch.rand(1, 6, 6, generator=_generator(47)) > 0.5
    operator = Inpainting(mask, noise_std=0.1)

    y = operator.simulate(torch.ones(2, 1, 6, 6, dtype=DTYPE), generator=_generator(48))

    assert torch.all(y[:, ~mask] == 0)


def test_poisson_gaussian_sample_moments():
    gain, offset, read_noise_std = 2.5, 100.0, 3.0
    photons = torch.tensor([0.5, 5.0, 50.0], dtype=DTYPE)
    n = 200_000
    Ax = photons.reshape(1, 1, 1, 3).expand(n, 1, 1, 3)

    y = PoissonGaussianNoise(gain, offset, read_noise_std).sample(Ax, generator=_generator(50))
    samples = y[:, 0, 0, :]

    # Exact moments of gain * Poisson(lam) + N(offset, read_noise_std^2). For a sum of independent
    # parts a and b the fourth central moment is mu4_a + 6 var_a var_b + mu4_b.
    mean = gain * photons + offset
    variance = gain**2 * photons + read_noise_std**2
    poisson_mu4 = gain**4 * photons * (1 + 3 * photons)
    mu4 = poisson_mu4 + 6 * gain**2 * photons * read_noise_std**2 + 3 * read_noise_std**4

    # Standard errors of the sample mean and of the sample variance for n draws.
    mean_standard_error = torch.sqrt(variance / n)
    variance_standard_error = torch.sqrt((mu4 - variance**2) / n)

    assert torch.all((samples.mean(0) - mean).abs() < 5 * mean_standard_error)
    assert torch.all((samples.var(0) - variance).abs() < 5 * variance_standard_error)


def test_poisson_gaussian_nll_is_gaussian_approximation():
    gain, offset, read_noise_std = 1.7, 20.0, 2.0
    noise = PoissonGaussianNoise(gain, offset, read_noise_std)
    Ax = torch.tensor([[[[0.0, 3.0, 40.0, -1.0]]]], dtype=DTYPE)
    y = torch.tensor([[[[19.0, 27.0, 90.0, 21.0]]]], dtype=DTYPE)

    Ax_values = Ax.flatten().tolist()
    y_values = y.flatten().tolist()
    expected = 0.0
    for a, b in zip(Ax_values, y_values):
        variance = gain**2 * max(a, 0.0) + read_noise_std**2
        expected += 0.5 * (b - gain * a - offset) ** 2 / variance + 0.5 * math.log(variance)

    assert noise.nll(y, Ax).item() == pytest.approx(expected, rel=1e-12)


def test_poisson_gaussian_nll_is_differentiable():
    operator = Convolution(torch.ones(3, 3) / 9, (1, 6, 6), noise=PoissonGaussianNoise(2.0, 5.0, 1.0))
    x = torch.full((1, 1, 6, 6), 10.0, dtype=DTYPE, requires_grad=True)
    y = operator.simulate(x.detach(), generator=_generator(51))

    operator.nll(x, y).sum().backward()

    assert x.grad is not None
    assert torch.isfinite(x.grad).all()


def test_anscombe_stabilizes_variance():
    gain, offset, read_noise_std = 2.0, 50.0, 4.0
    n = 200_000
    noise = PoissonGaussianNoise(gain, offset, read_noise_std)
    Ax = torch.full((n, 1, 1, 1), 40.0, dtype=DTYPE)

    transformed = anscombe(noise.sample(Ax, generator=_generator(52)), gain, offset, read_noise_std)

    # At 40 photons the transformed variance is about 1.003 (measured with 4e6 draws), and the
    # standard error of the sample variance is about sqrt(2 / n) = 0.003.
    assert transformed.var().item() == pytest.approx(1.0, abs=0.02)
    torch.testing.assert_close(noise.anscombe(Ax), anscombe(Ax, gain, offset, read_noise_std))


def test_anscombe_classical_form():
    y = torch.tensor([0.0, 1.0, 10.0], dtype=DTYPE)

    torch.testing.assert_close(anscombe(y), 2 * torch.sqrt(y + 0.375))


def test_composed_operator_noise_defaults_to_last():
    blur = Convolution(torch.ones(3, 3) / 9, (1, 8, 8), noise_std=5.0)
    downsample = Downsampling(2, (1, 8, 8), noise_std=0.2)

    default = ComposedOperator(blur, downsample)
    explicit = ComposedOperator(blur, downsample, noise_std=0.7)

    assert isinstance(default, LinearOperator)
    assert default.noise is downsample.noise
    assert explicit.noise.noise_std.item() == pytest.approx(0.7)
    assert default.in_shape == (1, 8, 8)
    assert default.out_shape == (1, 4, 4)


def test_nll_without_noise_model_raises():
    operator = Downsampling(2, (1, 4, 4))
    x = torch.zeros(1, 1, 4, 4)

    with pytest.raises(ValueError, match="no noise model"):
        operator.nll(x, torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="no noise model"):
        operator.simulate(x)


def test_input_with_nan_raises():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = float("nan")

    with pytest.raises(ValueError, match="x contains NaN or infinite values"):
        Downsampling(2, (1, 4, 4)).A(x)


def test_input_with_wrong_shape_raises():
    operator = Convolution(torch.ones(3, 3), (1, 32, 32))

    with pytest.raises(ValueError, match=r"x must have shape \(batch, 1, 32, 32\).*got \(2, 1, 31, 32\)"):
        operator.A(torch.zeros(2, 1, 31, 32))
    with pytest.raises(ValueError, match="x must have shape"):
        operator.A(torch.zeros(1, 32, 32))


def test_measurement_with_wrong_shape_raises():
    operator = Downsampling(2, (1, 8, 8))

    with pytest.raises(ValueError, match=r"y must have shape \(batch, 1, 4, 4\).*out_shape"):
        operator.A_adjoint(torch.zeros(1, 1, 8, 8))


def test_integer_input_raises():
    with pytest.raises(TypeError, match="x must have a floating-point dtype"):
        Inpainting(torch.ones(4, 4)).A(torch.zeros(1, 1, 4, 4, dtype=torch.int64))


def test_non_divisible_downsampling_raises():
    with pytest.raises(ValueError, match=r"in_shape \(1, 9, 8\) must have H and W divisible by factor=2"):
        Downsampling(2, (1, 9, 8))


def test_invalid_downsampling_factor_raises():
    with pytest.raises(ValueError, match="factor must be a positive int"):
        Downsampling(0, (1, 8, 8))


def test_mismatched_composition_raises():
    with pytest.raises(ValueError, match=r"operators\[1\].*in_shape \(1, 16, 16\).*out_shape \(1, 4, 4\)"):
        ComposedOperator(Downsampling(2, (1, 8, 8)), Downsampling(2, (1, 16, 16)))


def test_empty_composition_raises():
    with pytest.raises(ValueError, match="at least one operator"):
        ComposedOperator()


@pytest.mark.parametrize("noise_std", [-0.1, 0.0, float("nan"), float("inf")])
def test_invalid_noise_std_raises(noise_std):
    with pytest.raises(ValueError, match="noise_std must"):
        MatrixOperator(torch.eye(3), noise_std=noise_std)


def test_negative_noise_std_tensor_raises():
    with pytest.raises(ValueError, match="noise_std must contain only positive finite values"):
        GaussianNoise(torch.tensor([0.1, -0.2]))


def test_noise_std_and_noise_together_raise():
    with pytest.raises(ValueError, match="either noise_std= .* or noise="):
        MatrixOperator(torch.eye(2), noise_std=0.1, noise=GaussianNoise(0.1))


def test_invalid_poisson_gaussian_parameters_raise():
    with pytest.raises(ValueError, match="gain must be > 0"):
        PoissonGaussianNoise(gain=0.0)
    with pytest.raises(ValueError, match="read_noise_std must be >= 0"):
        PoissonGaussianNoise(gain=1.0, read_noise_std=-1.0)
    with pytest.raises(ValueError, match="offset must be finite"):
        PoissonGaussianNoise(gain=1.0, offset=float("nan"))


def test_poisson_sample_of_negative_counts_raises():
    with pytest.raises(ValueError, match="Ax must be a finite, non-negative expected photon count"):
        PoissonGaussianNoise(gain=1.0).sample(torch.tensor([[[[-1.0]]]]))


def test_psf_with_wrong_channels_raises():
    with pytest.raises(ValueError, match="psf must be shaped"):
        Convolution(torch.ones(2, 3, 3), (3, 8, 8))


def test_non_binary_mask_raises():
    with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
        Inpainting(torch.full((4, 4), 0.5))


def test_mask_not_fitting_in_shape_raises():
    with pytest.raises(ValueError, match=r"mask of shape \(2, 4, 4\) does not fit in_shape \(3, 4, 4\)"):
        Inpainting(torch.ones(2, 4, 4), in_shape=(3, 4, 4))
