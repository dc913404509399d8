"""VLBI data: uvfits loading with ehtim, standard preprocessing, and the data products the
likelihood uses (visibilities, amplitudes, closure phases, log closure amplitudes).

Conventions are ehtim's (version 1.2.7 and later). Images are ``npix x npix`` with pixel size
``psize`` in radians. The DFT matrix is ``ehtim.observing.obs_helpers.ftmatrix`` with the
image's pulse (a triangle pulse by default). Closure quantities are ehtim's minimal
(non-redundant) sets, closure phases are in degrees, and amplitudes are debiased.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

UAS = math.pi / 180 / 3600 / 1e6  # one microarcsecond in radians


def import_ehtim():
    """Import ehtim without the banner and NFFT warning it prints on import."""
    with contextlib.redirect_stdout(io.StringIO()):
        import ehtim

    return ehtim


def quiet(function, *args, **kwargs):
    """Call an ehtim function with its progress prints captured and logged at debug level.

    numpy's RuntimeWarnings from ehtim (such as empty RL/LR averages in Stokes I files) are silenced.
    """
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = function(*args, **kwargs)
    text = buffer.getvalue().strip()
    if text:
        logger.debug("ehtim: %s", text)
    return result


def load_uvfits(path: str | os.PathLike):
    """Load a uvfits file as an ehtim ``Obsdata``; raise ``ValueError`` for an empty or corrupt file."""
    eh = import_ehtim()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"uvfits file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"uvfits file {path} is empty (0 bytes)")
    try:
        obs = quiet(eh.obsdata.load_uvfits, str(path))
    except Exception as exc:  # astropy and ehtim raise many types for malformed files
        raise ValueError(f"cannot read {path} as uvfits: {type(exc).__name__}: {exc}") from exc
    if obs.data is None or len(obs.data) == 0:
        raise ValueError(f"{path} contains no visibilities")
    return obs


def preprocess(obs, scan_average: bool = True, systematic_noise: float = 0.0, flag_zero_baselines: bool = True):
    """Standard preprocessing, returning a new ``Obsdata``.

    - flag zero-length (intra-site) baselines, such as ALMA-APEX and JCMT-SMA, whose
      visibilities measure flux on scales far larger than the field of view;
    - coherent scan averaging (scans found by ``add_scans`` when the file has no NX table);
    - optional fractional systematic noise added in quadrature to every sigma.
    """
    obs = obs.copy()
    if flag_zero_baselines:
        obs = quiet(obs.flag_uvdist, uv_min=0.1e9)
        if len(obs.data) == 0:
            raise ValueError("no baselines longer than 0.1 Glambda remain after flagging zero-length baselines")
    if scan_average:
        if obs.scans is None or len(obs.scans) == 0:
            quiet(obs.add_scans)
        obs = quiet(obs.avg_coherent, 0.0, scan_avg=True)
    if systematic_noise:
        if not 0 <= systematic_noise < 1:
            raise ValueError(f"systematic_noise is a fraction of the amplitude in [0, 1); got {systematic_noise}")
        obs = quiet(obs.add_fractional_noise, systematic_noise)
    return obs


def estimate_total_flux(obs, uv_max: float = 0.1e9) -> float:
    """Total flux (Jy): median amplitude on baselines shorter than ``uv_max`` (lambda).

    On EHT data these are the intra-site baselines (ALMA-APEX, JCMT-SMA), which see the compact
    source as unresolved. Call this before :func:`preprocess` flags them.
    """
    data = obs.unpack(["uvdist", "amp"])
    short = data["amp"][data["uvdist"] < uv_max]
    if len(short) == 0:
        raise ValueError(f"no baselines shorter than {uv_max / 1e9:g} Glambda to estimate the total flux; pass total_flux (--total-flux on the command line)")
    return float(np.median(short))


@dataclass
class ClosureData:
    """Data products of one observation on one image grid, ready for the torch operators.

    ``uv`` contains the distinct (u, v) points used by any product; every product refers to them by
    index, so each visibility is computed once. ``dft`` is ehtim's DFT matrix at those points.
    """

    npix: int
    psize: float  # radians
    uv: np.ndarray  # (K, 2)
    dft: np.ndarray  # (K, npix * npix) complex
    vis: np.ndarray
    vis_sigma: np.ndarray
    vis_index: np.ndarray  # (N_vis,)
    amp: np.ndarray
    amp_sigma: np.ndarray
    amp_index: np.ndarray
    cphase: np.ndarray  # degrees
    cphase_sigma: np.ndarray  # degrees
    cphase_index: np.ndarray  # (N_cp, 3)
    logcamp: np.ndarray
    logcamp_sigma: np.ndarray
    logcamp_index: np.ndarray  # (N_camp, 4): log|V1| + log|V2| - log|V3| - log|V4|
    total_flux: float
    template: object  # ehtim Image with the grid, position and frequency of the data


def empty_image(obs, npix: int, fov_uas: float):
    """Make an ehtim ``Image`` of zeros on the reconstruction grid, positioned like ``obs``."""
    eh = import_ehtim()
    return quiet(eh.image.make_empty, npix, fov_uas * UAS, obs.ra, obs.dec, rf=obs.rf, source=obs.source, mjd=obs.mjd)


def closure_data(obs, npix: int, fov_uas: float, total_flux: float | None = None, **chisq_kwargs) -> ClosureData:
    """Collect every data product of ``obs`` on an ``npix x npix`` grid over ``fov_uas`` microarcseconds.

    ``chisq_kwargs`` go to ehtim's ``chisqdata_*`` (such as ``snrcut`` or ``systematic_cphase_noise``).
    """
    from ehtim.imaging import imager_utils as iu
    from ehtim.observing import obs_helpers as oh

    if not isinstance(npix, int) or npix < 8:
        raise ValueError(f"npix must be an integer >= 8; got {npix!r}")
    if not fov_uas > 0:
        raise ValueError(f"fov must be positive (microarcseconds); got {fov_uas}")
    template = empty_image(obs, npix, fov_uas)
    beam_uas = quiet(obs.res) / UAS
    if fov_uas < beam_uas:
        raise ValueError(f"the field of view ({fov_uas:g} uas) is smaller than the nominal beam ({beam_uas:.1f} uas); enlarge --fov")
    mask: list = []
    vis, vis_sigma, _ = quiet(iu.chisqdata_vis, obs, template, mask, **chisq_kwargs)
    amp, amp_sigma, _ = quiet(iu.chisqdata_amp, obs, template, mask, **chisq_kwargs)
    uv_vis = obs.unpack(["u", "v"])
    uv_vis = np.stack([uv_vis["u"], uv_vis["v"]], 1)
    no_triangles = "the observation has no closure triangles (no scan with 3 or more stations observing together)"
    table = obs.unpack(["time", "t1", "t2"])
    stations_per_time: dict[float, set] = {}
    for time, t1, t2 in zip(table["time"], table["t1"], table["t2"]):
        stations_per_time.setdefault(float(time), set()).update((t1, t2))
    if max((len(s) for s in stations_per_time.values()), default=0) < 3:
        raise ValueError(no_triangles)  # checked here because ehtim's closure code fails on such data
    cphase_table = quiet(obs.c_phases, mode="all", count="min")
    if not isinstance(cphase_table, np.ndarray) or len(cphase_table) == 0:  # ehtim returns [] when there are none
        raise ValueError(no_triangles)
    logcamp_table = quiet(obs.c_amplitudes, mode="all", count="min", ctype="logcamp", debias=True)
    if not isinstance(logcamp_table, np.ndarray):
        logcamp_table = np.zeros(0)
    cp_uv = [np.stack([cphase_table[f"u{k}"], cphase_table[f"v{k}"]], 1) for k in (1, 2, 3)]
    lc_uv = [np.stack([logcamp_table[f"u{k}"], logcamp_table[f"v{k}"]], 1) for k in (1, 2, 3, 4)] if len(logcamp_table) else []
    cphase, cphase_sigma, _ = quiet(iu.chisqdata_cphase, obs, template, mask, **chisq_kwargs)
    logcamp, logcamp_sigma = np.zeros(0), np.zeros(0)
    if len(logcamp_table):
        logcamp, logcamp_sigma, _ = quiet(iu.chisqdata_logcamp, obs, template, mask, **chisq_kwargs)

    if len(cphase) != len(cphase_table) or len(logcamp) != len(logcamp_table) or len(vis) != len(uv_vis):
        # ehtim's chisqdata_* filter (snrcut, cp_uv_min, maxset) while the (u, v) tables above do not.
        raise ValueError(f"options {sorted(chisq_kwargs)} removed data points, so values and (u, v) points no longer match; "
                         "flag the observation itself instead (such as obs.flag_low_snr)")
    blocks = [uv_vis, *cp_uv, *lc_uv]
    uv, inverse = np.unique(np.concatenate(blocks), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    sizes = np.cumsum([0] + [len(b) for b in blocks])
    parts = [inverse[a:b] for a, b in zip(sizes[:-1], sizes[1:])]
    dft = oh.ftmatrix(template.psize, npix, npix, uv, pulse=template.pulse)
    flux = float(total_flux) if total_flux is not None else None
    return ClosureData(
        npix=npix, psize=float(template.psize), uv=uv, dft=dft,
        vis=np.asarray(vis), vis_sigma=np.asarray(vis_sigma), vis_index=parts[0],
        amp=np.asarray(amp), amp_sigma=np.asarray(amp_sigma), amp_index=parts[0],
        cphase=np.asarray(cphase), cphase_sigma=np.asarray(cphase_sigma), cphase_index=np.stack(parts[1:4], 1),
        logcamp=np.asarray(logcamp), logcamp_sigma=np.asarray(logcamp_sigma),
        logcamp_index=np.stack(parts[4:8], 1) if lc_uv else np.zeros((0, 4), dtype=np.int64),
        total_flux=flux if flux is not None else float("nan"), template=template,
    )  # fmt: skip
