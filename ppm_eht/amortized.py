"""Amortized VLBI imaging: one generator for every observation with one array's (u, v) coverage.

:func:`train_on_coverage` simulates many observations with the (u, v) coverage and closure
uncertainties of one real observation. Images from a synthetic generator (by default the ring
family the shipped prior was trained on) are mapped to Jy with the observation's total flux.
Their closure phases and log closure amplitudes are computed, and Gaussian noise with the
data's own closure sigmas is added. The generator is trained on these closure products alone
(the images are not used). :func:`reconstruct_amortized` draws posterior samples for an
observation with the same coverage in one pass.

NOTE: the noise is added to the closure products, as the likelihood models it, and not to
visibilities with station gains. Closure products cancel the gains, and their noise is close
to Gaussian only at high signal-to-noise ratio, so low-SNR closures are simulated too kindly.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ppm_core.inference.amortized import AmortizedModel, load_amortized, read_amortized_config
from ppm_core.inference.api import _is_int
from ppm_core.priors.base import Prior
from ppm_core.priors.network import DiffusionPrior
from ppm_core.training.amortized import AmortizedConfig, train_amortized
from ppm_core.training.data import SyntheticSource

from .data import UAS
from .reconstruct import ClosureProblem, VLBIPosterior, closure_problem

logger = logging.getLogger(__name__)

TASK = "vlbi closure imaging"


def synthetic_observations(problem: ClosureProblem, n: int, images: str = "rings", seed: int = 0, batch: int = 64) -> tuple[Tensor, Tensor]:
    """Simulate ``n`` closure measurements with the coverage and sigmas of ``problem``.

    Returns the prior-space images ``(n, 1, npix, npix)`` and their noisy closure products
    ``(n, *problem.operator.out_shape)`` (closure phases in radians, then log closure amplitudes).
    """
    if not _is_int(n) or n < 1:
        raise ValueError(f"the number of observations must be a positive integer; got {n!r}")
    source = SyntheticSource(images)
    if source.normalization.get("method") != "fixed":
        raise ValueError(f"synthetic images {images!r} use a per-image normalization; VLBI needs a generator with a fixed one (such as 'rings')")
    generator = torch.Generator().manual_seed(seed)
    npix = problem.data.npix
    closure = problem.closure
    sigma = torch.cat([closure.cphase_sigma, closure.logcamp_sigma]).reshape(1, *problem.operator.out_shape)
    truths, measurements = [], []
    for start in range(0, n, batch):
        count = min(batch, n - start)
        z = source.sample(count, npix, generator).to(torch.float64)
        with torch.no_grad():
            clean = problem.operator.A(z)
        noise = sigma * torch.randn(clean.shape, generator=generator, dtype=clean.dtype)
        truths.append(z)
        measurements.append(clean + noise)
    return torch.cat(truths), torch.cat(measurements)


def train_on_coverage(
    obs,
    prior: Prior,
    out_dir,
    n_observations: int = 512,
    images: str = "rings",
    npix: int = 64,
    fov_uas: float = 160.0,
    total_flux: float | None = None,
    systematic_noise: float = 0.02,
    config: AmortizedConfig | None = None,
    resume: bool = False,
    callback=None,
    seed: int = 0,
    device: str = "cpu",
    description: dict[str, Any] | None = None,
    reference_fwhm_uas: float = 20.0,
) -> AmortizedModel:
    """Train an amortized VLBI model on simulated observations with the coverage of ``obs``.

    ``images`` names the synthetic generator of the simulated sources, and ``n_observations`` is
    how many are simulated (seeded by ``seed``). The other grid and data settings are those of
    :func:`~ppm_eht.reconstruct.reconstruct_uvfits`. ``reference_fwhm_uas`` sets the compact
    source at which the measurement embedding takes the likelihood's gradient.
    """
    problem = closure_problem(obs, prior, npix, fov_uas, total_flux, systematic_noise)
    _, measurements = synthetic_observations(problem, n_observations, images, seed)
    info = {
        "task": TASK,
        "coverage": coverage_of(problem),
        "images": images,
        "observations": n_observations,
        "n_cphase": len(problem.data.cphase),
        "n_logcamp": len(problem.data.logcamp),
    } | problem.settings | dict(description or {})
    logger.info("training on %d simulated observations (%d closure phases, %d log closure amplitudes each)",
                n_observations, len(problem.data.cphase), len(problem.data.logcamp))
    return train_amortized(measurements.float(), problem.operator, prior, out_dir, config, resume=resume, device=device,
                           callback=callback, description=info, reference=compact_source(problem, reference_fwhm_uas))


def compact_source(problem: ClosureProblem, fwhm_uas: float = 20.0) -> Tensor:
    """Return a centred circular Gaussian of ``fwhm_uas`` with peak brightness 1, in the prior's space, ``(1, 1, npix, npix)``.

    The reference image of the measurement embedding: its visibilities stay well above zero on
    the EHT baselines, so the gradients of closure phases and amplitudes there are well defined.
    """
    npix = problem.data.npix
    pixel_uas = problem.data.psize / UAS
    coords = (torch.arange(npix, dtype=torch.float64) - (npix - 1) / 2) * pixel_uas
    r2 = coords[:, None] ** 2 + coords[None, :] ** 2
    brightness = torch.exp(-4 * math.log(2) * r2 / fwhm_uas**2)
    operator = problem.operator
    return ((brightness - operator.offset) / operator.scale).reshape(1, 1, npix, npix).float()


def coverage_of(problem: ClosureProblem) -> dict[str, Any]:
    """Describe the coverage of a closure problem: source, date, frequency and a SHA-256 of its (u, v) points and closure sets."""
    data = problem.data
    digest = hashlib.sha256()
    for array in (data.uv, data.cphase_index, data.logcamp_index):
        digest.update(np.ascontiguousarray(np.round(np.asarray(array, dtype=np.float64), 3)).tobytes())
    obs = problem.processed
    return {"source": obs.source, "mjd": int(obs.mjd), "rf_ghz": obs.rf / 1e9, "sha256": digest.hexdigest()}


def model_problem(model_dir, obs, total_flux: float | None = None) -> tuple[ClosureProblem, dict]:
    """Build the closure problem of ``obs`` on the grid and with the settings of an amortized VLBI model."""
    config = read_amortized_config(model_dir)
    info = config.get("description", {})
    if info.get("task") != TASK:
        raise ValueError(f"the amortized model in {model_dir} was trained for {info.get('task', 'another task')!r}, not {TASK!r}")
    prior = DiffusionPrior.from_config(config["prior"])
    problem = closure_problem(obs, prior, int(info["npix"]), float(info["fov_uas"]), total_flux, float(info["systematic_noise"]),
                              bool(info.get("scan_average", True)))
    expected = (info["n_cphase"], info["n_logcamp"])
    found = (len(problem.data.cphase), len(problem.data.logcamp))
    if found != expected:
        raise ValueError(f"the model was trained on a coverage with {expected[0]} closure phases and {expected[1]} log closure amplitudes; "
                         f"this observation has {found[0]} and {found[1]}. An amortized model applies to one array's (u, v) coverage")
    trained = info.get("coverage", {})
    if trained.get("sha256") != coverage_of(problem)["sha256"]:
        raise ValueError(f"the model was trained on the (u, v) coverage of {trained.get('source')} MJD {trained.get('mjd')} at "
                         f"{trained.get('rf_ghz', float('nan')):.1f} GHz; this observation's (u, v) points or closure sets differ. "
                         "An amortized model applies to one array's (u, v) coverage")
    return problem, config


def reconstruct_amortized(obs, model_dir, n_samples: int = 16, seed: int = 0, total_flux: float | None = None,
                          center: bool = True, device: str = "cpu") -> VLBIPosterior:
    """Posterior samples of the image behind ``obs`` from an amortized model, one generator pass each."""
    start = time.perf_counter()
    if not _is_int(n_samples) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer; got {n_samples!r}")
    problem, config = model_problem(model_dir, obs, total_flux)
    model = load_amortized(model_dir, problem.operator, device=device)
    y = problem.operator.measurement().to(model.generator.dtype)
    posterior = model.sample(y, n_samples, seed=seed)
    parameters = {"method": "ppm-amortized", "n_samples": n_samples, "seed": seed, "model": str(Path(model_dir)),
                  "model_trained_steps": config.get("trained_steps")}
    return problem.posterior(posterior.samples, parameters, center, time.perf_counter() - start)
