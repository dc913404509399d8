"""Microscopy science: PSF models, the super-resolution operator, noise estimation, OME-TIFF I/O,
tiling and metrics. Every expected value is computed independently of the code under test."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import tifffile
import torch

from ppm_core.operators import SignalDependentNoise
from ppm_napari import metrics, psf
from ppm_napari.io import read_pixel_size, read_result, read_widefield, resolve_pixel_size, write_result
from ppm_napari.noise import estimate_noise
from ppm_napari.operator import SuperResolution
from ppm_napari.superres import _axis_weight, tile_starts

OTF_488 = Path(__file__).resolve().parents[1] / "sample_data" / "biosr_mt" / "TIRF488_cam1_0_z30_OTF2d.mrc"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------
# PSF models


@pytest.mark.parametrize("na, wavelength", [(1.3, 525.0), (1.4, 600.0), (0.8, 488.0)])
def test_airy_fwhm_matches_diffraction_limit(na, wavelength):
    # Fine sampling (5 nm) so that pixel integration does not widen the peak measurably.
    kernel = psf.airy_psf(na, wavelength, pixel_size=5.0)
    measured = psf.fwhm(kernel) * 5.0
    assert measured == pytest.approx(0.51 * wavelength / na, rel=0.02)


def test_airy_is_normalized_centred_and_symmetric():
    kernel = psf.airy_psf(1.3, 525, 31.3)
    assert kernel.shape[0] % 2 == 1
    assert kernel.shape == kernel.shape[::-1]
    assert kernel.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.unravel_index(kernel.argmax(), kernel.shape) == (kernel.shape[0] // 2, kernel.shape[1] // 2)
    np.testing.assert_allclose(kernel, kernel.T, atol=1e-15)
    np.testing.assert_allclose(kernel, kernel[::-1], atol=1e-15)


def test_airy_first_zero():
    # The Airy intensity has its first zero at 0.61 wavelength / NA (sampled without integration).
    kernel = psf.airy_psf(1.0, 500, pixel_size=1.0, size=701, oversample=1)
    centre = 350
    profile = kernel[centre, centre:]
    first_minimum = int(np.argmax(np.diff(profile) > 0))
    assert first_minimum == pytest.approx(0.61 * 500 / 1.0, abs=2)


@pytest.mark.parametrize("fwhm_px", [6.0, 12.0])
def test_gaussian_psf_fwhm_and_sum(fwhm_px):
    kernel = psf.gaussian_psf(fwhm_px)
    assert kernel.sum() == pytest.approx(1.0)
    assert psf.fwhm(kernel) == pytest.approx(fwhm_px, rel=0.03)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: psf.airy_psf(0, 525, 30), "na"),
        (lambda: psf.airy_psf(2.0, 525, 30), "na"),
        (lambda: psf.airy_psf(1.3, 0.525, 30), "wavelength"),
        (lambda: psf.airy_psf(1.3, 525, float("nan")), "pixel_size"),
        (lambda: psf.airy_psf(1.3, 525, 500), "pixel_size"),
        (lambda: psf.airy_psf(1.3, 525, 30, size=64), "size"),
        (lambda: psf.gaussian_psf(-1), "fwhm_px"),
    ],
)
def test_psf_bad_parameters(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_psf_from_otf_reproduces_the_file_profile():
    pixel = 31.3
    kernel = psf.psf_from_otf(OTF_488, pixel, size=127)
    assert kernel.sum() == pytest.approx(1.0)
    profile, dk = psf.read_otf_mrc(OTF_488)
    # Independent check: the PSF's own transfer function at radial frequency k along the x axis.
    freqs = np.fft.fftfreq(127, d=pixel * 1e-3)
    otf = np.abs(np.fft.fft2(np.fft.ifftshift(kernel)))[0]
    for index in (4, 8, 16, 24):
        k = freqs[index]
        expected = np.interp(k, np.arange(len(profile)) * dk, profile.real)
        assert otf[index] == pytest.approx(expected, abs=0.02)
    # Cutoff near 2 NA / wavelength: NA about 1.3 at 488-525 nm gives a FWHM near 0.51 lambda / NA.
    assert 180 < psf.fwhm(kernel) * pixel < 240


def test_otf_file_errors(tmp_path):
    empty = tmp_path / "empty.mrc"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.mrc"):
        psf.read_otf_mrc(empty)
    garbage = tmp_path / "garbage.mrc"
    garbage.write_bytes(b"not an mrc file" * 10)
    with pytest.raises(ValueError, match="garbage.mrc"):
        psf.read_otf_mrc(garbage)
    with pytest.raises(FileNotFoundError, match="missing.mrc"):
        psf.read_otf_mrc(tmp_path / "missing.mrc")


def _bead_image(shift=(0.3, -0.4), pixel=20.0, background=50.0, seed=0):
    """An Airy bead at a sub-pixel offset, on a background, with Poisson noise."""
    fine = psf.airy_psf(1.3, 525, pixel / 5, size=5 * 41, oversample=1)
    from scipy import ndimage

    shifted = ndimage.shift(fine, (shift[0] * 5, shift[1] * 5), order=1)
    binned = shifted.reshape(41, 5, 41, 5).sum(axis=(1, 3))
    rng = np.random.default_rng(seed)
    return rng.poisson(binned * 2e5 + background).astype(float)


def test_measured_psf_is_centred_resampled_and_normalized():
    bead = _bead_image()
    kernel = psf.measured_psf(bead, psf_pixel_size=20.0, target_pixel_size=31.3)
    assert kernel.shape[0] % 2 == 1
    assert kernel.sum() == pytest.approx(1.0)
    centre = kernel.shape[0] // 2
    yy, xx = np.indices(kernel.shape)
    assert (kernel * yy).sum() == pytest.approx(centre, abs=0.1)
    assert (kernel * xx).sum() == pytest.approx(centre, abs=0.1)
    assert psf.fwhm(kernel) * 31.3 == pytest.approx(psf.fwhm(psf.airy_psf(1.3, 525, 5.0)) * 5.0, rel=0.08)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"psf_pixel_size": None, "target_pixel_size": 31.3}, "pixel size is unknown"),
        ({"psf_pixel_size": 20.0, "target_pixel_size": None}, "target pixel size"),
        ({"psf_pixel_size": 0.02, "target_pixel_size": 31.3}, "differ by more than 8x"),
    ],
)
def test_measured_psf_pixel_size_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        psf.measured_psf(_bead_image(), **kwargs)


def test_measured_psf_bad_images():
    with pytest.raises(ValueError, match="NaN"):
        psf.measured_psf(np.full((21, 21), np.nan), 20, 30)
    with pytest.raises(ValueError, match="flat"):
        psf.measured_psf(np.ones((21, 21)), 20, 30)
    with pytest.raises(ValueError, match="2-D"):
        psf.measured_psf(np.ones((2, 2, 21, 21)), 20, 30)


# ------------------------------------------------------------------------------------------------
# Operator


@pytest.mark.parametrize("scale, shape", [(2, (16, 16)), (2, (13, 7)), (3, (11, 9)), (1, (10, 12))])
def test_superresolution_adjoint(scale, shape):
    op = SuperResolution(psf.airy_psf(1.3, 525, 31.3, size=15), scale, shape).double()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, *op.in_shape, generator=generator, dtype=torch.float64)
    y = torch.randn(3, *op.out_shape, generator=generator, dtype=torch.float64)
    lhs = (op.A(x) * y).sum()
    rhs = (x * op.A_adjoint(y)).sum()
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-10)


def test_superresolution_matches_scipy_interior():
    kernel = psf.airy_psf(1.3, 525, 31.3, size=15)
    op = SuperResolution(kernel, 2, (20, 24)).double()
    rng = np.random.default_rng(1)
    x = rng.random((40, 48))
    expected = scipy.signal.convolve2d(x, kernel, mode="same").reshape(20, 2, 24, 2).mean(axis=(1, 3))
    got = op.A(torch.from_numpy(x)[None, None])[0, 0].numpy()
    interior = (slice(4, -4), slice(4, -4))  # 7 fine pixels of PSF radius -> 4 camera pixels
    np.testing.assert_allclose(got[interior], expected[interior], rtol=1e-10, atol=1e-12)
    constant = op.A(torch.full((1, 1, 40, 48), 3.5, dtype=torch.float64))
    np.testing.assert_allclose(constant.numpy(), 3.5, rtol=1e-12)


@pytest.mark.parametrize(
    "kernel, scale, shape, message",
    [
        (np.ones((4, 4)) / 16, 2, (8, 8), "odd sides"),
        (np.ones((3, 3)) / 3, 2, (8, 8), "sum to 1"),
        (-np.ones((3, 3)) / 9, 2, (8, 8), "non-negative"),
        (np.ones((3, 3)) / 9, 0, (8, 8), "scale"),
        (np.ones((3, 3)) / 9, 2, (8,), "measurement_shape"),
    ],
)
def test_superresolution_bad_arguments(kernel, scale, shape, message):
    with pytest.raises(ValueError, match=message):
        SuperResolution(kernel, scale, shape)


# ------------------------------------------------------------------------------------------------
# Noise


def _smooth_image(size=128, seed=0):
    rng = np.random.default_rng(seed)
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.random((size, size)), 4)
    return (field - field.min()) / (field.max() - field.min())


def test_noise_estimate_recovers_poisson_gaussian_parameters():
    gain, offset, read = 2.0, 100.0, 3.0
    photons = 20 + 400 * _smooth_image(256)
    rng = np.random.default_rng(2)
    image = gain * rng.poisson(photons) + offset + read * rng.normal(size=photons.shape)
    noise = estimate_noise(image)
    assert noise.slope == pytest.approx(gain, rel=0.06)
    # Variance at the median level, where the fit is best constrained.
    level = float(np.median(gain * photons + offset))
    assert noise.slope * level + noise.intercept == pytest.approx(gain * (level - offset) + read**2, rel=0.06)


def test_noise_estimate_of_gaussian_noise():
    rng = np.random.default_rng(3)
    image = 1000 * _smooth_image(256) + 7.0 * rng.normal(size=(256, 256))
    noise = estimate_noise(image)
    level = 500.0
    assert math.sqrt(noise.slope * level + noise.intercept) == pytest.approx(7.0, rel=0.06)


def test_signal_dependent_noise_rescaling():
    noise = SignalDependentNoise(2.0, -150.0, 1.0)
    rescaled = noise.rescaled(offset=100.0, scale=4.0)
    ax = torch.tensor([300.0, 800.0])
    # Var of (y - 100) / 4 is Var y / 16, at the rescaled signal (Ax - 100) / 4.
    np.testing.assert_allclose(rescaled.variance((ax - 100) / 4).numpy(), noise.variance(ax).numpy() / 16)


@pytest.mark.parametrize("image, message", [(np.ones((8, 8)), "16x16"), (np.full((32, 32), np.nan), "NaN"), (np.ones((32, 32)), "constant")])
def test_noise_estimate_bad_images(image, message):
    with pytest.raises(ValueError, match=message):
        estimate_noise(image)


# ------------------------------------------------------------------------------------------------
# Files


def test_ome_tiff_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    mean = rng.random((20, 30)).astype(np.float32)
    std = rng.random((20, 30)).astype(np.float32)
    samples = rng.random((3, 20, 30)).astype(np.float32)
    parameters = {"method": "ppm", "scale": 2, "n_samples": 3, "psf": {"kind": "airy", "na": 1.3}, "options": {"lr": 0.03}}
    path = write_result(tmp_path / "r.ome.tif", mean, std, samples, 31.3, parameters)
    result = read_result(path)
    np.testing.assert_array_equal(result["mean"], mean)
    np.testing.assert_array_equal(result["std"], std)
    np.testing.assert_array_equal(result["samples"], samples)
    assert result["pixel_size_nm"] == pytest.approx(31.3)
    assert result["channel_names"] == ["posterior mean", "posterior std", "sample 1", "sample 2", "sample 3"]
    assert result["parameters"] == parameters
    assert read_pixel_size(path) == pytest.approx(31.3)


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.ome.tif"
    image = np.ones((8, 8), np.float32)
    write_result(path, image, image, image[None], 30.0, {"method": "first"})
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValueError):
        write_result(path, image, image, image[None], 30.0, circular)
    assert read_result(path)["parameters"] == {"method": "first"}
    assert [p.name for p in tmp_path.iterdir()] == ["r.ome.tif"]


def test_pixel_size_from_imagej_and_ome_metadata(tmp_path):
    image = np.ones((16, 16), np.float32)
    tifffile.imwrite(tmp_path / "ij.tif", image, imagej=True, resolution=(1 / 0.0626, 1 / 0.0626), metadata={"unit": "um"})
    tifffile.imwrite(tmp_path / "ome.tif", image, ome=True, metadata={"PhysicalSizeX": 62.6, "PhysicalSizeXUnit": "nm"})
    tifffile.imwrite(tmp_path / "plain.tif", image)
    assert read_pixel_size(tmp_path / "ij.tif") == pytest.approx(62.6)
    assert read_pixel_size(tmp_path / "ome.tif") == pytest.approx(62.6)
    assert read_pixel_size(tmp_path / "plain.tif") is None
    assert resolve_pixel_size(tmp_path / "plain.tif", 62.6) == 62.6
    assert resolve_pixel_size(tmp_path / "ij.tif", None) == pytest.approx(62.6)
    with pytest.raises(ValueError, match="not in its metadata; pass --pixel-size"):
        resolve_pixel_size(tmp_path / "plain.tif", None)
    with pytest.raises(ValueError, match="does not match the pixel size 62.6"):
        resolve_pixel_size(tmp_path / "ij.tif", 80.0)


def test_read_widefield_averages_stacks_and_rejects_bad_files(tmp_path):
    stack = np.arange(3 * 16 * 16, dtype=np.uint16).reshape(3, 16, 16)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    image, frames = read_widefield(tmp_path / "stack.tif")
    assert frames == 3
    np.testing.assert_allclose(image, stack.mean(0))
    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_widefield(tmp_path / "empty.tif")
    (tmp_path / "corrupt.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ValueError, match="corrupt.tif"):
        read_widefield(tmp_path / "corrupt.tif")
    bad = np.ones((16, 16), np.float32)
    bad[3, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", bad)
    with pytest.raises(ValueError, match="NaN"):
        read_widefield(tmp_path / "nan.tif")


# ------------------------------------------------------------------------------------------------
# Tiling


@pytest.mark.parametrize("length, tile, overlap", [(128, 48, 16), (100, 40, 10), (130, 128, 16), (64, 64, 16)])
def test_tile_weights_sum_to_one(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0
    assert min(starts[-1] + tile, length) == length
    for a, b in zip(starts, starts[1:]):
        assert a + tile - b >= overlap
    scale = 2
    total = np.zeros(length * scale)
    for s in starts:
        stop = min(s + tile, length)
        total[s * scale : stop * scale] += _axis_weight(s, stop, starts, tile, scale)
    np.testing.assert_allclose(total, 1.0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Metrics


def test_metrics_against_direct_formulas():
    rng = np.random.default_rng(0)
    truth = rng.random((64, 64)) * 1000 + 200
    assert metrics.psnr(3 * truth - 7, truth, "fitted") > 200  # exact up to rounding
    noisy = truth + rng.normal(0, 10, truth.shape)
    mse = np.mean((noisy - truth) ** 2)
    a, b = np.polyfit(noisy.ravel(), truth.ravel(), 1)
    fitted_mse = np.mean((a * noisy + b - truth) ** 2)
    assert metrics.psnr(noisy, truth, "fitted") == pytest.approx(10 * np.log10((truth.max() - truth.min()) ** 2 / fitted_mse))
    assert fitted_mse <= mse
    t01 = (truth - truth.min()) / np.ptp(truth)
    n01 = (noisy - noisy.min()) / np.ptp(noisy)
    assert metrics.psnr(noisy, truth, "minmax") == pytest.approx(10 * np.log10(1 / np.mean((n01 - t01) ** 2)))
    assert metrics.ssim(truth, truth, "minmax") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="super-resolved grid"):
        metrics.psnr(truth[:10], truth)


def test_coverage_of_calibrated_samples_is_nominal():
    rng = np.random.default_rng(1)
    mean = rng.random((64, 64)) * 10
    std = 0.5 + rng.random((64, 64))
    samples = mean + std * rng.normal(size=(200, 64, 64))
    truth = mean + std * rng.normal(size=(64, 64))
    # In other units, as a SIM ground truth would be: coverage maps it back by the affine fit.
    assert metrics.coverage(samples, samples.mean(0), 4 * truth + 30) == pytest.approx(0.9, abs=0.02)
    assert metrics.diversity(np.repeat(mean[None], 4, 0)) == pytest.approx(0.0, abs=1e-12)
