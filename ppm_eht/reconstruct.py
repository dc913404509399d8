"""Posterior imaging of VLBI data: closure products of a uvfits file, a black-hole prior, samples.

Intensity units. Closure phases and log closure amplitudes do not change when the image is
multiplied by a constant, so they do not constrain the total flux. The prior works in its
normalized space ``z`` (for the shipped ring prior, ``u = (z + 1) / 2`` is a brightness with a
peak near 1). Each sample is mapped to Jy per pixel by ``x = F u / sum(u)``, with ``F`` the
total flux measured on the intra-site baselines (or given). The likelihood of ``z`` is then that
of its closure products alone, and every sample has total flux ``F``: the posterior describes
the image's shape, not its flux.

Position. Closure products do not change when the image moves, so the posterior leaves the
position free. Each sample is shifted to put its ring centre (or, without a ring, its
brightness centroid) at the image centre before means and standard deviations are taken.
``center=False`` keeps the raw samples.

Image grid. The prior was trained on a fixed pixel size (2.5 microarcseconds for the shipped
prior: 64 pixels over 160); ``npix`` and ``fov_uas`` must keep it.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ppm_core.inference.api import reconstruct
from ppm_core.operators import Operator
from ppm_core.priors.base import Prior

from .data import UAS, ClosureData, closure_data, estimate_total_flux, import_ehtim, load_uvfits, preprocess
from .features import RingFeatures, ring_features
from .operators import ClosureOperator

logger = logging.getLogger(__name__)

DEFAULT_PRIOR = Path(__file__).parent / "models" / "rings-64"
METHODS = ("ppm", "red-diff", "dps", "rlsd", "ikl", "ppm-sim")

#: Settings for 64x64 images on CPU (see docs/benchmarks.md); any can be overridden.
EHT_DEFAULTS: dict[str, dict[str, Any]] = {
    # sigma_min 0.05 (not 0.01): below it the patch-2 prior network adds a 2-pixel grid texture, and
    # on M87 the closure chi-squares reach about 1.4 instead of 2.4 in 600 steps.
    "ppm": {"steps": 600, "lr": 0.02, "init": "prior", "aux_steps": 1, "sigma_min": 0.05},
    "ppm-sim": {"steps": 600, "lr": 0.02, "init": "prior", "aux_steps": 1, "sigma_min": 0.05},
    "ikl": {"steps": 600, "lr": 0.02, "init": "prior", "aux_steps": 1, "sigma_min": 0.05},
    # The closure likelihood has no Gaussian noise level to scale RED-Diff's weight by, so it is set here.
    "red-diff": {"steps": 600, "lr": 0.05, "init": "prior", "reg_weight": 0.05},
    "rlsd": {"steps": 600, "lr": 0.05, "init": "prior", "reg_weight": 0.05},
    "dps": {"steps": 200, "zeta": 0.4},
}


UNITS = {"diameter": "uas", "width": "uas", "position_angle": "deg east of north", "asymmetry": ""}


def peak_memory_mb() -> float:
    """Peak resident memory of this process in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def prior_pixel_size(config: dict) -> float | None:
    """Pixel size (microarcseconds) of a prior's training images, when its config records one.

    Priors trained on ``--synthetic rings`` see 160 microarcseconds over the crop size.
    """
    from .rings import FOV_UAS

    training_data = config.get("training_data") or {}
    if training_data.get("generator") == "rings":
        crop = (config.get("training") or {}).get("crop_size")
        return FOV_UAS / crop if crop else None
    value = training_data.get("pixel_size_uas")
    return float(value) if value else None


class FluxNormalizedClosure(Operator):
    """Closure likelihood of prior-space images ``z``: ``x = F u / sum(u)``, ``u = z * scale + offset``.

    Parameters
    ----------
    closure : ClosureOperator
        Closure products and likelihood of the data, on images in Jy per pixel.
    offset, scale : float
        The prior's affine normalization (``z = (u - offset) / scale``).
    total_flux : float
        ``F`` in Jy.
    """

    def __init__(self, closure: ClosureOperator, offset: float, scale: float, total_flux: float):
        if not total_flux > 0:
            raise ValueError(f"total_flux must be positive (Jy); got {total_flux}")
        super().__init__(closure.in_shape, closure.out_shape)
        self.closure = closure
        self.offset, self.scale, self.total_flux = float(offset), float(scale), float(total_flux)
        # Sums below this are clamped, so an image with almost no emission cannot divide by zero.
        self.min_sum = 1e-3 * closure.data.npix**2

    def to_jy(self, z: Tensor) -> Tensor:
        """Map prior-space images to Jy per pixel with total flux ``F``."""
        u = z * self.scale + self.offset
        total = u.flatten(1).sum(1).clamp_min(self.min_sum)
        return self.total_flux * u / total.reshape(-1, 1, 1, 1)

    def _A(self, z: Tensor) -> Tensor:
        return self.closure._A(self.to_jy(z))

    def measurement(self) -> Tensor:
        """Return the observed closure products, shaped like ``A(z)``."""
        return self.closure.measurement()

    def nll(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """Closure negative log-likelihood of each image, ``(batch,)``; ``y`` as in :meth:`ClosureOperator.nll`."""
        self.check_input(z)
        return self.closure.nll(self.to_jy(z), y)

    def dps_residual(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        """Noise-weighted residual norm ``sqrt(2 nll)`` that DPS descends instead of ``||y - A(x)||``."""
        return torch.sqrt(2 * self.nll(z, y).clamp_min(0) + 1e-12)


@dataclass
class VLBIPosterior:
    """Posterior images of one observation, in Jy per pixel and ehtim's pixel order.

    ``samples`` is ``(n, npix, npix)``, centred on the ring unless the run set ``center=False``.
    ``uncentred`` contains the same samples before that shift. ``chisq`` gives ehtim's reduced
    chi-squares of each uncentred sample for closure phases and log closure amplitudes, and
    ``features`` the ring of each sample. ``diagnostics`` holds the inference's end-of-run
    checks (:attr:`ppm_core.Posterior.diagnostics`), such as the auxiliary's fit per noise band.
    """

    samples: np.ndarray
    obs: Any
    data: ClosureData
    chisq: dict[str, np.ndarray]
    features: list[RingFeatures | None]
    parameters: dict[str, Any] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    uncentred: np.ndarray | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> np.ndarray:
        return self.samples.mean(0)

    @property
    def std(self) -> np.ndarray:
        return self.samples.std(0, ddof=1) if len(self.samples) > 1 else np.zeros_like(self.samples[0])

    @property
    def psize_uas(self) -> float:
        return self.data.psize / UAS

    def image(self, array: np.ndarray):
        """Return an ehtim ``Image`` of ``array`` (Jy per pixel) on the observation's grid and position."""
        eh = import_ehtim()
        template = self.data.template
        return eh.image.Image(np.asarray(array, dtype=np.float64), template.psize, template.ra, template.dec,
                              rf=template.rf, source=template.source, mjd=template.mjd, pulse=template.pulse)

    @property
    def images(self) -> list:
        """The samples as ehtim ``Image`` objects."""
        return [self.image(sample) for sample in self.samples]

    @property
    def mean_image(self):
        return self.image(self.mean)

    @property
    def std_image(self):
        return self.image(self.std)

    def feature_summary(self) -> dict[str, dict]:
        """Per-sample values, mean and std of the ring diameter, width and position angle."""
        summary = {}
        for name in ("diameter", "width", "position_angle", "asymmetry"):
            values = np.array([getattr(f, name) if f is not None else np.nan for f in self.features])
            finite = values[np.isfinite(values)]
            entry: dict[str, Any] = {"samples": [None if not np.isfinite(v) else float(v) for v in values], "n_rings": int(len(finite))}
            if name == "position_angle" and len(finite):
                # Circular mean and std of an angle, in degrees.
                vector = np.exp(1j * np.radians(finite)).mean()
                entry["mean"] = float(np.degrees(np.angle(vector)) % 360)
                entry["std"] = float(np.degrees(np.sqrt(-2 * np.log(max(abs(vector), 1e-12)))))
            elif len(finite):
                entry["mean"] = float(finite.mean())
                entry["std"] = float(finite.std(ddof=1)) if len(finite) > 1 else 0.0
            entry["unit"] = UNITS[name]
            summary[name] = entry
        mean_ring = self.features_of(self.mean)
        summary["mean_image"] = mean_ring.as_dict() if mean_ring is not None else None
        return summary

    def features_of(self, array: np.ndarray) -> RingFeatures | None:
        return find_ring(array, self.psize_uas)

    def summary(self) -> dict[str, Any]:
        """Return a JSON-serializable summary: run parameters, chi-squares and ring features."""
        chisq = {name: {"samples": values.tolist(), "median": float(np.median(values))} for name, values in self.chisq.items()}
        # NOTE: chi-squares are of the samples before centring; the mean is of the centred samples.
        mean_chisq = {name: float(value) for name, value in self.chisq_of(self.mean).items()}
        return {
            "parameters": self.parameters,
            "reduced_chisq": chisq,
            "reduced_chisq_of_mean": mean_chisq,
            "ring": self.feature_summary(),
            "total_flux_jy": float(self.samples[0].sum()),
            "pixel_size_uas": self.psize_uas,
            "seconds": self.seconds,
            "peak_memory_mb": self.peak_memory_mb,
            "diagnostics": self.diagnostics,
        }

    def chisq_of(self, array: np.ndarray) -> dict[str, float]:
        """ehtim's reduced chi-squares of closure phases and log closure amplitudes for one image."""
        operator = ClosureOperator(self.data, terms=("cphase", "logcamp"))
        x = torch.as_tensor(np.asarray(array, dtype=np.float64))[None, None]
        counts = {"cphase": len(self.data.cphase), "logcamp": len(self.data.logcamp)}
        return {dtype: float(operator.chisq(x, dtype)[0]) for dtype, count in counts.items() if count}


def find_ring(image: np.ndarray, psize_uas: float, max_spread: float = 0.3) -> RingFeatures | None:
    """Return the ring of ``image``, or None when there is none (peak radii spread by more than ``max_spread``)."""
    try:
        ring = ring_features(image, psize_uas)
    except ValueError:
        return None
    return ring if ring.radius_spread <= max_spread else None


def center_image(image: np.ndarray, psize_uas: float) -> np.ndarray:
    """Shift ``image`` periodically (a Fourier phase ramp, which keeps the flux) to centre its ring.

    The ring centre is the one :func:`~ppm_eht.features.ring_features` finds. An image without
    a ring (peak radii spread by more than 30%) is centred on its brightness centroid. The
    target is ``(n - 1) / 2`` along each axis, the phase centre of ehtim's pixel grid.
    """
    from scipy import ndimage

    positive = np.clip(image, 0, None)
    if positive.sum() <= 0:
        return image
    n_rows, n_cols = image.shape
    ring = find_ring(image, psize_uas)
    if ring is not None:
        # Centre east/north in uas -> pixel offsets from the grid centre (east is towards column 0).
        shift = (ring.center_north / psize_uas, ring.center_east / psize_uas)
    else:
        rows, cols = np.indices(image.shape)
        total = positive.sum()
        shift = ((n_rows - 1) / 2 - (rows * positive).sum() / total, (n_cols - 1) / 2 - (cols * positive).sum() / total)
    return np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(image), shift)).real


def check_grid(npix: int, fov_uas: float, prior_pixel_uas: float | None, tolerance: float = 0.05) -> None:
    """Raise ``ValueError`` when the image grid's pixel size differs from the prior's."""
    if prior_pixel_uas is None:
        return
    pixel = fov_uas / npix
    if abs(pixel / prior_pixel_uas - 1) > tolerance:
        raise ValueError(
            f"the prior was trained on {prior_pixel_uas:g} uas pixels, but fov / npix = {fov_uas:g} / {npix} = {pixel:.3g} uas; "
            f"use fov = {npix * prior_pixel_uas:g} for npix = {npix}, or a prior trained on this pixel size"
        )


def reconstruct_obs(
    obs,
    prior: Prior,
    npix: int = 64,
    fov_uas: float = 160.0,
    method: str = "ppm",
    n_samples: int = 16,
    steps: int | None = None,
    seed: int = 0,
    total_flux: float | None = None,
    systematic_noise: float = 0.02,
    scan_average: bool = True,
    prior_pixel_uas: float | None = None,
    center: bool = True,
    callback: Callable[[dict], bool | None] | None = None,
    **options: Any,
) -> VLBIPosterior:
    """Posterior samples of the image behind an ehtim ``Obsdata`` (see :func:`reconstruct_uvfits`)."""
    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer; got {n_samples!r}")
    problem = closure_problem(obs, prior, npix, fov_uas, total_flux, systematic_noise, scan_average, prior_pixel_uas)
    operator, data = problem.operator, problem.data

    settings = dict(EHT_DEFAULTS[method])
    settings.update(options)
    if steps is not None:
        settings["steps"] = steps
    steps = settings.pop("steps")
    logger.info("%s: %d closure phases, %d log closure amplitudes, total flux %.3g Jy (%s)",
                obs.source, len(data.cphase), len(data.logcamp), problem.total_flux, problem.flux_source)
    posterior = reconstruct(operator.measurement(), operator, prior, method=method, n_samples=n_samples, steps=steps,
                            seed=seed, callback=callback, **settings)
    parameters = {
        "method": method,
        "n_samples": n_samples,
        "steps": steps,
        "seed": seed,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()},
    }
    return problem.posterior(posterior.samples, parameters, center, time.perf_counter() - start, posterior.history, posterior.diagnostics)


@dataclass
class ClosureProblem:
    """The closure likelihood of one observation on one image grid, in the prior's space."""

    operator: FluxNormalizedClosure
    closure: ClosureOperator
    data: ClosureData
    processed: Any  # the preprocessed ehtim Obsdata
    total_flux: float
    flux_source: str
    settings: dict[str, Any]

    def posterior(self, z_samples: Tensor, parameters: dict[str, Any], center: bool = True, seconds: float = 0.0,
                  history: dict | None = None, diagnostics: dict | None = None) -> VLBIPosterior:
        """Map prior-space samples to Jy, compute their chi-squares and ring features, and centre them."""
        data, closure = self.data, self.closure
        with torch.no_grad():
            x = self.operator.to_jy(z_samples.double())
            # Chi-squares of the samples themselves, before the (sub-pixel, periodic) centring shift.
            chisq = {dtype: closure.chisq(x, dtype).numpy() for dtype, count in (("cphase", len(data.cphase)), ("logcamp", len(data.logcamp)))
                     if count}
            samples = x[:, 0].numpy()
        psize_uas = data.psize / UAS
        uncentred = samples
        if center:
            samples = np.stack([center_image(sample, psize_uas) for sample in samples])
        features = [find_ring(sample, psize_uas) for sample in samples]
        if sum(f is None for f in features):
            logger.warning("%d of %d samples have no ring (REx peak radii spread by more than 30%%); they are left out of the ring "
                           "statistics", sum(f is None for f in features), len(features))
        obs = self.processed
        parameters = dict(parameters) | self.settings | {
            "centered": center,
            "likelihood": "closure phases + log closure amplitudes (ehtim minimal sets, debiased)",
            "n_cphase": len(data.cphase),
            "n_logcamp": len(data.logcamp),
            "source": obs.source,
            "mjd": int(obs.mjd),
            "rf_ghz": obs.rf / 1e9,
        }
        return VLBIPosterior(samples, obs, data, chisq, features, parameters, dict(history or {}), seconds, peak_memory_mb(),
                             uncentred, dict(diagnostics or {}))


def closure_problem(obs, prior: Prior, npix: int = 64, fov_uas: float = 160.0, total_flux: float | None = None,
                    systematic_noise: float = 0.02, scan_average: bool = True, prior_pixel_uas: float | None = None) -> ClosureProblem:
    """Check the grid and the prior, preprocess ``obs`` and build its closure likelihood (see :func:`reconstruct_uvfits`)."""
    check_grid(npix, fov_uas, prior_pixel_uas)
    channels = getattr(prior, "in_channels", 1)
    if channels != 1:
        raise ValueError(f"the prior models images with {channels} channels; a Stokes I image has 1")
    flux_source = "given"
    if total_flux is None:
        total_flux = estimate_total_flux(obs)
        flux_source = "median amplitude on baselines shorter than 0.1 Glambda"
    if not total_flux > 0:
        raise ValueError(f"total_flux must be positive (Jy); got {total_flux}")
    processed = preprocess(obs, scan_average=scan_average, systematic_noise=systematic_noise)
    data = closure_data(processed, npix, fov_uas, total_flux=total_flux)
    closure = ClosureOperator(data, terms=("cphase", "logcamp"))
    normalization = getattr(prior, "normalization", {"method": "fixed", "offset": 0.5, "scale": 0.5})
    if normalization.get("method") != "fixed":
        raise ValueError(
            f"the prior's intensity normalization is {normalization.get('method')!r}; VLBI imaging needs a prior trained with a "
            "fixed normalization (such as --synthetic rings), because the image's brightness range is unknown before imaging"
        )
    operator = FluxNormalizedClosure(closure, normalization["offset"], normalization["scale"], total_flux)
    settings = {"npix": npix, "fov_uas": fov_uas, "total_flux_jy": total_flux, "total_flux_source": flux_source,
                "systematic_noise": systematic_noise, "scan_average": scan_average}
    return ClosureProblem(operator, closure, data, processed, float(total_flux), flux_source, settings)


def reconstruct_uvfits(
    path: str | os.PathLike,
    prior: Prior | str | os.PathLike | None = None,
    npix: int = 64,
    fov_uas: float = 160.0,
    method: str = "ppm",
    n_samples: int = 16,
    steps: int | None = None,
    seed: int = 0,
    total_flux: float | None = None,
    systematic_noise: float = 0.02,
    center: bool = True,
    callback: Callable[[dict], bool | None] | None = None,
    **options: Any,
) -> VLBIPosterior:
    """Posterior samples of the Stokes I image behind a uvfits file, from its closure products.

    Parameters
    ----------
    path : path
        uvfits file (read by ``ehtim.obsdata.load_uvfits``).
    prior : Prior or path, optional
        Diffusion prior or prior folder, the shipped ring prior by default. Only a folder's config
        records the training pixel size, so a ``Prior`` object is not checked against the grid.
    npix, fov_uas : int, float
        Image grid: ``npix x npix`` pixels over ``fov_uas`` microarcseconds.
    method : one of :data:`METHODS`
        ``"ppm"`` (default) or a baseline of :func:`ppm_core.reconstruct`.
    n_samples, steps, seed, options
        Passed to :func:`ppm_core.reconstruct`; :data:`EHT_DEFAULTS` fills what is not given.
    total_flux : float, optional
        Total flux in Jy; by default the median amplitude on the intra-site baselines.
    systematic_noise : float
        Fractional systematic noise added to the visibility amplitudes before the closure
        products are formed (2% by default, a usual choice for EHT data).
    center : bool
        Shift each sample so that its ring centre (else its brightness centroid) is at the image centre. Closure
        products do not change when the image moves, so the posterior leaves the position free,
        and a mean over samples at different positions would be smeared.
    callback : callable, optional
        Gets ``{"iteration", "steps", "losses", "mean"}`` after each iteration; returning ``True``
        cancels with ``ReconstructionCancelled``.

    Returns
    -------
    VLBIPosterior
        Samples in Jy per pixel, with ehtim ``Image`` views (``images``, ``mean_image``,
        ``std_image``), per-sample chi-squares and ring features.
    """
    from ppm_core.priors import load_prior
    from ppm_core.priors.network import read_config

    prior_pixel = None
    if prior is None or isinstance(prior, (str, os.PathLike)):
        folder = Path(prior) if prior is not None else DEFAULT_PRIOR
        prior = load_prior(folder)
        prior_pixel = prior_pixel_size(read_config(folder))
    obs = load_uvfits(path)
    return reconstruct_obs(obs, prior, npix=npix, fov_uas=fov_uas, method=method, n_samples=n_samples, steps=steps, seed=seed,
                           total_flux=total_flux, systematic_noise=systematic_noise, prior_pixel_uas=prior_pixel,
                           center=center, callback=callback, **options)

