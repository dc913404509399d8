"""Files of the VLBI tools: posterior FITS, model images, synthetic observations, RML imaging.

Posterior FITS layout. The primary HDU is the posterior mean with ehtim's own header (written
by ``Image.save_fits``: ``RA---SIN``/``DEC--SIN`` axes, ``CDELT`` in degrees, ``OBSRA``,
``OBSDEC``, ``FREQ``, ``MJD``, ``BUNIT = JY/PIXEL``), so ``ehtim.image.load_fits`` reads the
mean. Image extensions follow with the same axes: ``STD`` (per-pixel standard deviation) and
``SAMPLE1`` .. ``SAMPLEn``. Every sample header carries its reduced chi-squares
(``CHI2CP``, ``CHI2LCA``) and ring features (``RINGD``, ``RINGW``, ``RINGPA``, in uas and
degrees). The primary header records the method, the number of samples and the run parameters
as JSON in ``HISTORY`` cards.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ppm_core.io import atomic_path

from .data import UAS, import_ehtim, quiet

logger = logging.getLogger(__name__)

__all__ = ["write_posterior_fits", "read_posterior_fits", "load_model_image", "simulate_observation", "rml_image"]


def write_posterior_fits(path: str | os.PathLike, posterior) -> Path:
    """Write a :class:`~ppm_eht.reconstruct.VLBIPosterior` as FITS (layout in the module docstring), atomically."""
    from astropy.io import fits

    path = Path(path)
    with atomic_path(path) as tmp:
        quiet(posterior.mean_image.save_fits, str(tmp))
        with fits.open(tmp) as opened:
            primary = fits.PrimaryHDU(opened[0].data.copy(), header=opened[0].header.copy())
        header = primary.header
        header["ORIGIN"] = "ppm-imaging"
        header["PPMMETH"] = (posterior.parameters.get("method", ""), "posterior method")
        header["NSAMPLES"] = (len(posterior.samples), "posterior samples in SAMPLEn extensions")
        header["CONTENT"] = ("posterior mean", "primary HDU")
        text = json.dumps(posterior.parameters, default=str)
        for start in range(0, len(text), 70):
            header.add_history(text[start:start + 70])
        axes = {key: header[key] for key in ("CTYPE1", "CTYPE2", "CDELT1", "CDELT2", "CRPIX1", "CRPIX2", "OBSRA", "OBSDEC",
                                             "FREQ", "MJD", "OBJECT", "BUNIT") if key in header}
        hdus = [primary]
        std = fits.ImageHDU(posterior.std[::-1].astype(np.float64), name="STD")
        std.header.update(axes)
        std.header["CONTENT"] = "posterior standard deviation"
        hdus.append(std)
        for index, sample in enumerate(posterior.samples):
            hdu = fits.ImageHDU(np.asarray(sample)[::-1].astype(np.float64), name=f"SAMPLE{index + 1}")
            hdu.header.update(axes)
            hdu.header["CONTENT"] = f"posterior sample {index + 1}"
            if "cphase" in posterior.chisq:
                hdu.header["CHI2CP"] = (float(posterior.chisq["cphase"][index]), "reduced chi2 of closure phases (ehtim)")
            if "logcamp" in posterior.chisq:
                hdu.header["CHI2LCA"] = (float(posterior.chisq["logcamp"][index]), "reduced chi2 of log closure amplitudes")
            feature = posterior.features[index]
            if feature is not None:
                hdu.header["RINGD"] = (round(feature.diameter, 4), "ring diameter (uas)")
                if np.isfinite(feature.width):
                    hdu.header["RINGW"] = (round(feature.width, 4), "ring width, FWHM (uas)")
                hdu.header["RINGPA"] = (round(feature.position_angle, 3), "bright side, deg east of north")
            hdus.append(hdu)
        fits.HDUList(hdus).writeto(tmp, overwrite=True)
    return path


def read_posterior_fits(path: str | os.PathLike) -> dict:
    """Read a posterior FITS: ``mean``, ``std``, ``samples`` in ehtim's pixel order, ``header``, ``psize_uas``."""
    from astropy.io import fits

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"posterior FITS not found: {path}")
    try:
        with fits.open(path) as hdul:
            names = [hdu.name for hdu in hdul]
            if "STD" not in names:
                raise ValueError(f"{path} is not a PPM posterior FITS: no STD extension (extensions: {names})")
            mean = np.asarray(hdul[0].data, dtype=np.float64)[::-1]
            std = np.asarray(hdul["STD"].data, dtype=np.float64)[::-1]
            count = int(hdul[0].header.get("NSAMPLES", 0))
            if count < 1:
                raise ValueError(f"{path} is not a PPM posterior FITS: its primary header has no NSAMPLES >= 1")
            samples = np.stack([np.asarray(hdul[f"SAMPLE{i + 1}"].data, dtype=np.float64)[::-1] for i in range(count)])
            header = hdul[0].header.copy()
    except OSError as exc:
        raise ValueError(f"cannot read {path} as FITS: {exc}") from exc
    return {"mean": mean, "std": std, "samples": samples, "header": header, "psize_uas": abs(header["CDELT2"]) * 3600e6}


def load_model_image(path: str | os.PathLike):
    """Load a model image (ehtim text ``.txt`` or FITS) as an ehtim ``Image``, with errors that name the file."""
    eh = import_ehtim()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model image not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"model image {path} is empty (0 bytes)")
    suffix = path.suffix.lower()
    try:
        if suffix in (".fits", ".fit", ".fts"):
            image = quiet(eh.image.load_fits, str(path))
        elif suffix == ".txt":
            image = quiet(eh.image.load_txt, str(path))
        else:
            raise ValueError(f"model image must be .fits or .txt (ehtim text format); got {path.name}")
    except ValueError:
        raise
    except Exception as exc:  # ehtim and astropy raise many types for malformed files
        raise ValueError(f"cannot read model image {path}: {type(exc).__name__}: {exc}") from exc
    if not np.all(np.isfinite(image.imvec)) or image.total_flux() <= 0:
        raise ValueError(f"model image {path} has NaN pixels or no positive flux")
    return image


def simulate_observation(model, like, gain_error: float = 0.0, phase_error: bool = False, seed: int = 0, add_noise: bool = True):
    """Observe ``model`` (ehtim ``Image``) with the (u, v) coverage, times and sigmas of ``like`` (``Obsdata``).

    Thermal noise is drawn from the file's sigmas. ``gain_error`` (a fraction) applies random
    station gain amplitudes, constant per scan; ``phase_error`` randomizes station phases, as an
    uncalibrated atmosphere does. Closure products are immune to both.
    """
    import numpy.random

    if not 0 <= gain_error < 1:
        raise ValueError(f"gain_error is a fraction in [0, 1); got {gain_error}")
    model = model.copy()
    model.ra, model.dec, model.rf, model.mjd, model.source = like.ra, like.dec, like.rf, like.mjd, like.source
    corrupt = gain_error > 0 or phase_error
    like = like.copy()
    if like.scans is None or len(like.scans) == 0:
        quiet(like.add_scans)  # gains are drawn per scan
    numpy.random.seed(seed)  # ehtim draws thermal noise from numpy's global generator
    return quiet(
        model.observe_same, like, ttype="direct", add_th_noise=add_noise, jones=corrupt, ampcal=gain_error == 0,
        phasecal=not phase_error, stabilize_scan_phase=True, stabilize_scan_amp=True, gain_offset=gain_error, gainp=gain_error,
        seed=seed + 1, verbose=False,
    )


def rml_image(obs, npix: int = 64, fov_uas: float = 160.0, total_flux: float | None = None, systematic_noise: float = 0.02,
              prior_fwhm_uas: float = 40.0, iterations: int = 100):
    """ehtim's regularized maximum-likelihood image from closure phases and log closure amplitudes.

    The regularizers are those of the EHT collaboration's fiducial ehtim M87 script (2019, Paper
    IV): relative entropy to a Gaussian of ``prior_fwhm_uas``, TV, TV2 and a total-flux
    constraint (10^4), normalized. Unlike that script, only closure products are fitted and
    there is no self-calibration. The entropy weight is therefore 1 (not 100), against data
    weights of 10, 100 and 200 in three stages: with weight 100 the closure-only image stays a
    Gaussian blob. In each stage imaging runs four times, restarting from the previous image blurred to
    the nominal resolution (the first start is the Gaussian). Returns an ehtim ``Image``.
    """
    from .data import estimate_total_flux, preprocess

    eh = import_ehtim()
    if total_flux is None:
        total_flux = estimate_total_flux(obs)
    data = preprocess(obs, systematic_noise=systematic_noise)
    fwhm = prior_fwhm_uas * UAS
    gauss = quiet(eh.image.make_square, data, npix, fov_uas * UAS)
    gauss = gauss.add_gauss(total_flux, (fwhm, fwhm, 0, 0, 0))
    gauss = gauss.add_gauss(total_flux * 1e-3, (fwhm, fwhm, 0, fwhm, fwhm))  # breaks the symmetry of the start
    beam = quiet(data.res)
    regularizers = {"simple": 1, "tv": 1, "tv2": 1, "flux": 1e4}
    image = gauss
    for weight in (10, 100, 200):
        for repeat in range(4):
            start = image if image is gauss else image.blur_circ(beam)
            imager = quiet(
                eh.imager.Imager, data, start, prior_im=gauss, flux=total_flux, data_term={"cphase": weight, "logcamp": weight},
                reg_term=regularizers, maxit=iterations, ttype="direct", norm_reg=True, stop=1e-4,
            )
            image = quiet(imager.make_image_I, show_updates=False)
    return image
