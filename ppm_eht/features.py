"""Ring features of black-hole images: diameter, width, position angle of the bright side.

The definitions follow the image-domain ring extraction (REx) of the EHT M87 results (Paper IV,
2019, section 9). Radial profiles are taken from a centre at ``n_angles`` position angles. The
centre is the point that makes the radii of the profile peaks most alike (smallest std / mean).
Then:

- diameter ``d``: twice the mean peak radius;
- width ``w``: mean full width at half maximum of the radial profiles, measured from the
  profile's minimum (the floor) to its peak;
- position angle: ``arg(sum_theta I(theta) exp(i theta))``, with ``I(theta)`` the brightness
  integrated over ``d/2 +- w/2``, in degrees east of north;
- asymmetry: ``|sum I exp(i theta)| / sum I``.

ehtim ships REx (``ehtim.features.rex``), but it uses ``scipy.interpolate.interp2d``, which
SciPy 1.14 removed, and it prints; this module is a vectorized reimplementation of the same
definitions.

Images follow ehtim's pixel order: row 0 is north, column 0 is east, pixel ``(i, j)`` sits at
east ``((n - 1) / 2 - j) p`` and north ``((n - 1) / 2 - i) p``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage, optimize

__all__ = ["RingFeatures", "ring_features"]


@dataclass
class RingFeatures:
    """Ring parameters of one image (angles in degrees east of north, sizes in microarcseconds)."""

    diameter: float
    width: float
    position_angle: float
    asymmetry: float
    center_east: float
    center_north: float
    radius_spread: float  # std / mean of the peak radii: 0 for a perfect circle

    def as_dict(self) -> dict:
        """Return the fields as floats, with None for an undefined value (such as a width without half-maximum crossings)."""
        return {key: float(value) if np.isfinite(value) else None for key, value in asdict(self).items()}


def _profiles(image: np.ndarray, psize: float, east: float, north: float, radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Bilinearly sampled radial profiles, ``(n_angles, n_radii)``."""
    n_rows, n_cols = image.shape
    offset_east = east + radii[None, :] * np.sin(angles[:, None])
    offset_north = north + radii[None, :] * np.cos(angles[:, None])
    cols = (n_cols - 1) / 2 - offset_east / psize
    rows = (n_rows - 1) / 2 - offset_north / psize
    return ndimage.map_coordinates(image, [rows, cols], order=1, mode="constant", cval=0.0)


def _peak_radii(profiles: np.ndarray, radii: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radius and value of each profile's maximum, refined by a parabola through three samples."""
    k = np.argmax(profiles, axis=1)
    k = np.clip(k, 1, profiles.shape[1] - 2)
    rows = np.arange(len(profiles))
    left, mid, right = profiles[rows, k - 1], profiles[rows, k], profiles[rows, k + 1]
    denominator = left + right - 2 * mid
    step = radii[1] - radii[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(denominator < 0, 0.5 * (left - right) / denominator, 0.0)
    shift = np.clip(shift, -0.5, 0.5)
    return radii[k] + shift * step, mid - 0.25 * (left - right) * shift


def _half_max_width(profile: np.ndarray, radii: np.ndarray, peak_radius: float) -> float:
    """Full width at half maximum around the peak, from the profile's floor; NaN without both crossings."""
    k = int(np.argmin(np.abs(radii - peak_radius)))
    peak, floor = profile[k], profile.min()
    half = floor + 0.5 * (peak - floor)
    inner = np.nonzero(profile[:k] < half)[0]
    outer = np.nonzero(profile[k:] < half)[0]
    if not len(inner) or not len(outer) or peak <= floor:
        return float("nan")
    i = inner[-1]
    o = k + outer[0]
    r_in = radii[i] + (half - profile[i]) / (profile[i + 1] - profile[i]) * (radii[i + 1] - radii[i])
    r_out = radii[o - 1] + (profile[o - 1] - half) / (profile[o - 1] - profile[o]) * (radii[o] - radii[o - 1])
    return float(r_out - r_in)


def ring_features(
    image: np.ndarray,
    psize_uas: float,
    diameter_range: tuple[float, float] = (10.0, 100.0),
    n_angles: int = 120,
    search_uas: float = 20.0,
    threshold: float = 0.05,
) -> RingFeatures:
    """Measure the ring of one image (see the module docstring).

    Parameters
    ----------
    image : (n, n) array
        Brightness per pixel (any units), in ehtim's pixel order.
    psize_uas : float
        Pixel size in microarcseconds.
    diameter_range : (float, float)
        Diameters the centre search accepts, in microarcseconds.
    n_angles : int
        Radial profiles around the centre.
    search_uas : float
        Half side of the square around the brightness centroid where the centre is searched.
    threshold : float
        For the centre search only, pixels below this fraction of the maximum are set to zero.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be a square 2-D array; got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError("image contains NaN or infinite pixels")
    if not psize_uas > 0:
        raise ValueError(f"psize_uas must be positive; got {psize_uas}")
    if not image.max() > 0:
        raise ValueError("image has no positive pixel, so it has no ring")
    n = image.shape[0]
    fov = n * psize_uas
    radii = np.arange(0.0, min(diameter_range[1], fov / 2), psize_uas / 4)
    angles = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)
    search_image = np.where(image < threshold * image.max(), 0.0, image)

    positive = np.clip(image, 0, None)
    coords = ((n - 1) / 2 - np.arange(n)) * psize_uas
    east0 = float((positive.sum(0) * coords).sum() / positive.sum())
    north0 = float((positive.sum(1) * coords).sum() / positive.sum())

    def spread(center: np.ndarray) -> float:
        peaks, _ = _peak_radii(_profiles(search_image, psize_uas, center[0], center[1], radii, angles), radii)
        diameter = 2 * peaks.mean()
        if not diameter_range[0] <= diameter <= diameter_range[1]:
            return float("inf")
        return float(peaks.std() / peaks.mean())

    grid = np.arange(-search_uas, search_uas + 1e-9, psize_uas)
    candidates = [(east0 + de, north0 + dn) for de in grid for dn in grid]
    scores = [spread(np.array(c)) for c in candidates]
    if not np.isfinite(min(scores)):
        raise ValueError(f"no ring with a diameter in {diameter_range} uas around the brightness centroid")
    best = np.array(candidates[int(np.argmin(scores))])
    refined = optimize.minimize(spread, best, method="Nelder-Mead", options={"xatol": psize_uas / 20, "fatol": 1e-6})
    if refined.fun <= min(scores):
        best = refined.x

    profiles = _profiles(image, psize_uas, best[0], best[1], radii, angles)
    peaks, _ = _peak_radii(profiles, radii)
    diameter = 2 * float(peaks.mean())
    widths = np.array([_half_max_width(p, radii, r) for p, r in zip(profiles, peaks)])
    width = float(np.nanmean(widths)) if np.isfinite(widths).any() else float("nan")
    half = (width if np.isfinite(width) else psize_uas) / 2
    band = np.abs(radii[None, :] - diameter / 2) <= half
    brightness = (profiles * band * radii[None, :]).sum(1)
    moment = (brightness * np.exp(1j * angles)).sum()
    return RingFeatures(
        diameter=diameter,
        width=width,
        position_angle=float(np.degrees(np.angle(moment)) % 360),
        asymmetry=float(np.abs(moment) / max(brightness.sum(), 1e-300)),
        center_east=float(best[0]),
        center_north=float(best[1]),
        radius_spread=float(peaks.std() / peaks.mean()),
    )
