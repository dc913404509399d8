"""Point spread functions of widefield microscopes, sampled on the super-resolved grid.

Four sources, all returning a 2-D ``float64`` array of odd side, centred on the middle pixel and
summing to 1:

- :func:`airy_psf`: the in-focus scalar diffraction pattern of a circular pupil,
  ``I(r) = (2 J1(v) / v)^2`` with ``v = 2 pi NA r / wavelength``, integrated over each pixel.
  We write this model rather than depend on a vectorial PSF package, because the problem is 2-D
  and in focus, where the Airy pattern is the textbook widefield model. Real systems are wider:
  the bundled measured OTF of a 488 nm TIRF channel at NA about 1.3 gives a PSF FWHM of 214 nm,
  against 191 nm for the Airy model. When that matters, use the microscope's measured OTF or PSF.
- :func:`psf_from_otf`: a radially averaged OTF file (``*_OTF2d.mrc``, the format of Lin
  Shao's SIM software used by BioSR and rDL-SIM), interpolated onto the 2-D frequency grid and
  inverse Fourier transformed.
- :func:`measured_psf`: a bead image: background subtracted, centred, resampled to the target
  pixel size and normalized.
- :func:`gaussian_psf`: a Gaussian of given FWHM, the usual quick approximation.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
from scipy import ndimage, special

logger = logging.getLogger(__name__)

# Airy FWHM in units of wavelength / NA: 2 x the half-maximum root of (2 J1(v)/v)^2 over 2 pi.
AIRY_FWHM = 0.5145


def _check_positive(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number; got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number; got {value!r}")
    return value


MAX_DEFAULT_SIZE = 1025  # a default PSF wider than this means a unit mistake (nm vs um)


def _check_size(size: int | None, default: int) -> int:
    if size is None and default > MAX_DEFAULT_SIZE:
        raise ValueError(
            f"the PSF would be {default} pixels wide, which means the pixel size is far smaller than the PSF; "
            "check that the pixel size, wavelength and FWHM are all in nm"
        )
    size = default if size is None else size
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 3 or size % 2 == 0:
        raise ValueError(f"size must be an odd integer >= 3; got {size!r}")
    return int(size)


def _normalized(psf: np.ndarray) -> np.ndarray:
    total = psf.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("the PSF has no positive signal after background subtraction")
    return psf / total


def fwhm(psf: np.ndarray) -> float:
    """Full width at half maximum, in pixels, of the PSF's radial profile (azimuthal mean).

    The profile is the mean over rings of width 1/4 pixel around the centre pixel, and the
    half-maximum crossing is linearly interpolated between rings.
    """
    psf = np.asarray(psf, dtype=np.float64)
    cy, cx = (np.array(psf.shape) - 1) / 2
    yy, xx = np.indices(psf.shape)
    radius = np.hypot(yy - cy, xx - cx)
    bins = np.round(radius * 4).astype(int)
    counts = np.bincount(bins.ravel())
    profile = np.bincount(bins.ravel(), psf.ravel()) / np.maximum(counts, 1)
    radii = np.arange(len(profile)) / 4
    valid = counts > 0
    radii, profile = radii[valid], profile[valid]
    half = profile[0] / 2
    below = np.nonzero(profile < half)[0]
    if len(below) == 0:
        raise ValueError("the PSF does not fall to half its maximum inside the array; use a larger size")
    i = below[0]
    r0, r1, p0, p1 = radii[i - 1], radii[i], profile[i - 1], profile[i]
    return float(2 * (r0 + (p0 - half) * (r1 - r0) / (p0 - p1)))


def gaussian_psf(fwhm_px: float, size: int | None = None) -> np.ndarray:
    """Gaussian PSF with the given FWHM in pixels, integrated over each pixel.

    ``size`` (odd) defaults to cover four standard deviations each side.
    """
    fwhm_px = _check_positive("fwhm_px", fwhm_px)
    sigma = fwhm_px / (2 * math.sqrt(2 * math.log(2)))
    size = _check_size(size, 2 * max(int(math.ceil(4 * sigma)), 1) + 1)
    edges = np.arange(size + 1) - size / 2
    cdf = special.ndtr(edges / sigma)
    profile = np.diff(cdf)
    return _normalized(np.outer(profile, profile))


def airy_psf(na: float, wavelength: float, pixel_size: float, size: int | None = None, oversample: int = 9) -> np.ndarray:
    """In-focus widefield PSF of a circular pupil (Airy pattern), integrated over each pixel.

    Parameters
    ----------
    na : float
        Detection numerical aperture, in (0, 1.7].
    wavelength : float
        Emission wavelength, in nm.
    pixel_size : float
        Pixel size of the grid the PSF is sampled on (the super-resolved grid), in nm.
    size : int, optional
        Odd side of the array; by default four Airy radii (``4 x 0.61 wavelength / NA``) each side.
    oversample : int
        Sub-samples per pixel side for the pixel integration.
    """
    na = _check_positive("na", na)
    if na > 1.7:
        raise ValueError(f"na must be at most 1.7 (no immersion medium has a higher index); got {na}")
    wavelength = _check_positive("wavelength", wavelength)
    pixel_size = _check_positive("pixel_size", pixel_size)
    if wavelength < 100 or wavelength > 2000:
        raise ValueError(f"wavelength is in nm and must be in [100, 2000]; got {wavelength}")
    airy_radius = 0.61 * wavelength / na / pixel_size  # first zero, in pixels
    if airy_radius < 0.5:
        raise ValueError(
            f"pixel_size {pixel_size} nm is coarser than the Airy radius {airy_radius * pixel_size:.0f} nm; "
            "check the units (nm) of --pixel-size and --wavelength"
        )
    size = _check_size(size, 2 * int(math.ceil(4 * airy_radius)) + 1)
    if oversample < 1 or oversample % 2 == 0:
        raise ValueError(f"oversample must be an odd positive integer; got {oversample}")
    offsets = (np.arange(oversample) - (oversample - 1) / 2) / oversample
    coords = (np.arange(size) - size // 2)[:, None] + offsets[None, :]
    coords = coords.ravel()
    radius = np.hypot(coords[:, None], coords[None, :]) * pixel_size  # nm
    v = 2 * np.pi * na * radius / wavelength
    with np.errstate(invalid="ignore", divide="ignore"):
        amplitude = np.where(v > 1e-9, 2 * special.j1(v) / v, 1.0)
    intensity = amplitude**2
    binned = intensity.reshape(size, oversample, size, oversample).mean(axis=(1, 3))
    return _normalized(binned)


# ------------------------------------------------------------------------------------------------
# Radially averaged OTF files


def read_otf_mrc(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a radially averaged OTF (``*_OTF2d.mrc``): return the complex profile and ``dk`` (1/um).

    These files are MRC volumes of shape ``(1, 1, n)`` or ``(1, n)`` holding complex64 samples of
    the OTF at radial frequencies ``0, dk, 2 dk, ...``, where ``dk`` is stored as the voxel size
    along x. Their headers predate the MRC2014 "MAP " stamp, so they are opened in permissive mode.
    """
    import warnings

    import mrcfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OTF file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with mrcfile.open(path, permissive=True) as mrc:
                data = None if mrc.data is None else np.array(mrc.data)
                dk = float(mrc.voxel_size.x)
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot read OTF file {path} as MRC: {exc}") from exc
    if data is None or data.size < 4:
        raise ValueError(f"OTF file {path} contains no data (or fewer than 4 samples)")
    profile = data.reshape(-1)
    if not np.iscomplexobj(profile):
        profile = profile.astype(np.complex128)
    if not np.all(np.isfinite(profile)):
        raise ValueError(f"OTF file {path} contains NaN or infinite values")
    if not dk > 0 or not math.isfinite(dk):
        raise ValueError(f"OTF file {path} has no frequency spacing (voxel size x = {dk}); expected dk in 1/um")
    if abs(profile[0]) <= 0:
        raise ValueError(f"OTF file {path} has OTF(0) = 0; it is not an OTF")
    return profile / profile[0], dk


def psf_from_otf(path: str | os.PathLike, pixel_size: float, size: int = 63) -> np.ndarray:
    """2-D PSF on a grid of ``pixel_size`` nm from a radially averaged OTF file.

    The real part of the radial OTF is interpolated at ``k = sqrt(kx^2 + ky^2)`` on the
    ``size x size`` frequency grid, with zero beyond the last sample. The result is inverse
    Fourier transformed, centred, clipped at zero and normalized to sum 1. Clipping removes the
    small negative ringing of a truncated OTF.
    """
    pixel_size = _check_positive("pixel_size", pixel_size)
    size = _check_size(size, 63)
    profile, dk = read_otf_mrc(path)
    k_max_file = dk * (len(profile) - 1)
    nyquist = 0.5 / (pixel_size * 1e-3)  # 1/um
    if nyquist > k_max_file * 1.5 and abs(profile[-1]) > 0.05:
        raise ValueError(
            f"the OTF in {path} stops at {k_max_file:.2f} 1/um with |OTF| = {abs(profile[-1]):.2f}, "
            f"below the grid's Nyquist frequency {nyquist:.2f} 1/um; the PSF would be truncated"
        )
    freqs = np.fft.fftfreq(size, d=pixel_size * 1e-3)  # 1/um
    k = np.hypot(freqs[:, None], freqs[None, :])
    radial = np.arange(len(profile)) * dk
    otf = np.interp(k, radial, profile.real, right=0.0)
    psf = np.fft.fftshift(np.fft.ifft2(otf).real)
    return _normalized(np.clip(psf, 0, None))


# ------------------------------------------------------------------------------------------------
# Measured PSFs (bead images)


def measured_psf(
    image: np.ndarray,
    psf_pixel_size: float | None,
    target_pixel_size: float | None,
    size: int | None = None,
) -> np.ndarray:
    """Turn a bead image into a PSF on the target grid.

    Steps:

    1. pick the brightest plane of a 3-D stack;
    2. subtract the background (median of the outermost ring of pixels) and clip at zero;
    3. shift the centroid of the peak region to the central pixel (sub-pixel, cubic spline);
    4. resample by ``psf_pixel_size / target_pixel_size`` onto an odd ``size`` (default: the
       resampled extent) and normalize to sum 1.

    Raises
    ------
    ValueError
        If a pixel size is missing, the image is empty, not finite, flat, or not 2-D/3-D.
    """
    if psf_pixel_size is None:
        raise ValueError("the PSF's pixel size is unknown: it is not in the file's metadata; pass --psf-pixel-size (nm)")
    if target_pixel_size is None:
        raise ValueError("the target pixel size is unknown; pass the image's pixel size (nm)")
    psf_pixel_size = _check_positive("psf_pixel_size", psf_pixel_size)
    target_pixel_size = _check_positive("target_pixel_size", target_pixel_size)
    ratio = psf_pixel_size / target_pixel_size
    if not 1 / 8 <= ratio <= 8:
        raise ValueError(
            f"the PSF's pixel size ({psf_pixel_size} nm) and the target pixel size ({target_pixel_size} nm) differ by "
            f"more than 8x; check that both are in nm"
        )
    data = np.asarray(image, dtype=np.float64)
    if data.ndim == 3:
        plane = int(np.argmax(data.reshape(data.shape[0], -1).max(axis=1)))
        logger.info("PSF stack of %d planes: using plane %d, the brightest", data.shape[0], plane)
        data = data[plane]
    if data.ndim != 2:
        raise ValueError(f"a PSF image must be 2-D (or a 3-D stack); got shape {tuple(np.shape(image))}")
    if min(data.shape) < 5:
        raise ValueError(f"a PSF image must be at least 5x5 pixels; got {data.shape}")
    if not np.all(np.isfinite(data)):
        raise ValueError("the PSF image contains NaN or infinite values")
    border = np.concatenate([data[0], data[-1], data[1:-1, 0], data[1:-1, -1]])
    signal = np.clip(data - np.median(border), 0, None)
    if signal.max() <= 0:
        raise ValueError("the PSF image is flat: nothing is brighter than its border")

    # Centroid of the pixels above 10% of the peak, then a sub-pixel shift to the array centre.
    peak = signal > 0.1 * signal.max()
    labels, _ = ndimage.label(peak)
    brightest = labels[np.unravel_index(np.argmax(signal), signal.shape)]
    cy, cx = ndimage.center_of_mass(signal * (labels == brightest))
    side = 2 * (min(signal.shape) // 2) + 1
    centred = ndimage.shift(signal, ((signal.shape[0] - 1) / 2 - cy, (signal.shape[1] - 1) / 2 - cx), order=3, mode="constant")
    top = (signal.shape[0] - side) // 2
    left = (signal.shape[1] - side) // 2
    centred = centred[top : top + side, left : left + side]

    # Resample about the centre pixel onto an odd grid of the target pixel size.
    out_side = 2 * int(((side - 1) / 2) * ratio) + 1
    out_side = _check_size(size, max(out_side, 3))
    half = (out_side - 1) / 2
    coords = (np.arange(out_side) - half) / ratio + (side - 1) / 2
    grid = np.meshgrid(coords, coords, indexing="ij")
    resampled = ndimage.map_coordinates(centred, grid, order=3, mode="constant")
    return _normalized(np.clip(resampled, 0, None))
