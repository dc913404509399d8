"""``reconstruct``: one entry point for PPM and the baselines."""

from __future__ import annotations

import logging
import numbers
from typing import Any

import torch
from torch import Tensor

from ..priors.base import Prior
from .auxiliary import AUX_KINDS, LikelihoodFeature, auxiliary_fit, make_auxiliary
from .baselines import descending_sigmas, dps, gaussian_noise_std, ikl_prior_term, rbf_repulsion, red_diff_prior_term
from .common import Callback, LogUniformSigma, Posterior, prepare_measurement, weighting
from .particles import initial_particles, run_particles
from .ppm import ppm_prior_term

logger = logging.getLogger(__name__)

METHODS = ("ppm", "ppm-sim", "red-diff", "rlsd", "ikl", "dps")

#: Defaults per method. Values that no paper gives are our choices, as the docstrings state.
DEFAULTS: dict[str, dict[str, Any]] = {
    "ppm": {
        "steps": 1000,
        "lr": 2e-2,
        "lr_milestones": (0.5, 0.75),
        "lr_gamma": 0.3,
        "aux": None,  # "lora" for network priors, "residual" for analytic ones
        "aux_steps": 2,
        "aux_lr": 1e-3,
        "lora_rank": 8,
        "aux_feature": None,  # on for the residual auxiliary, off for network copies (cost)
        "distance": "l2",
        "huber_c": 1.0,
        "weighting": "kl",
        "sigma_min": 0.01,
        "sigma_max": 20.0,
        "init": "prior",
        "init_scale": 1.0,
        "data_weight": 1.0,
    },
    "red-diff": {"steps": 1000, "lr": 0.1, "lam": 0.25, "reg_weight": None, "sigma_min": 0.01, "sigma_max": 20.0, "init": "adjoint", "init_scale": 0.1, "data_weight": 1.0},
    "dps": {"steps": 250, "zeta": 0.5, "sigma_min": 0.002, "sigma_max": 80.0},
}
DEFAULTS["ppm-sim"] = dict(DEFAULTS["ppm"])
DEFAULTS["ikl"] = {k: v for k, v in DEFAULTS["ppm"].items() if k not in ("distance", "huber_c", "weighting")} | {"ikl_weight": 1.0}
DEFAULTS["rlsd"] = dict(DEFAULTS["red-diff"]) | {"gamma": 1.0}


def reconstruct(
    y: Tensor,
    operator,
    prior: Prior,
    method: str = "ppm",
    n_samples: int = 8,
    steps: int | None = None,
    seed: int = 0,
    callback: Callback | None = None,
    **options: Any,
) -> Posterior:
    """Draw posterior samples of ``x`` given ``y = A(x) + noise`` under a diffusion prior.

    Parameters
    ----------
    y : tensor of shape ``operator.out_shape`` or ``(1, *operator.out_shape)``
        The measurement, in the prior's normalized intensity space.
    operator : Operator
        Forward model with its noise model (``operator.nll``).
    prior : Prior
        Diffusion prior (network or analytic).
    method : {"ppm", "ppm-sim", "red-diff", "rlsd", "ikl", "dps"}
        ``"ppm"``: particle VI with the exact PPM gradient. ``"ppm-sim"``: the same with only the
        first network's gradient (ablation). The others are baselines; see
        :mod:`ppm_core.inference.baselines`.
    n_samples : int
        Number of particles (or independent runs for RED-Diff and DPS).
    steps : int, optional
        Iterations; the method's default when omitted.
    seed : int
        Seed of every random draw; a run on CPU is deterministic for a given seed.
    callback : callable, optional
        Called after each iteration with ``{"iteration", "steps", "losses", "mean"}``; returning
        ``True`` cancels the run with :class:`ReconstructionCancelled`.
    **options
        Method settings; ``DEFAULTS[method]`` lists them with their defaults. PPM options:
        ``aux`` ("lora", "full", "residual", "kde", "gaussian"), ``aux_steps``, ``aux_lr``,
        ``lora_rank``, ``aux_feature`` (give the trained auxiliary the scaled likelihood score
        as an input, see :class:`~ppm_core.inference.auxiliary.LikelihoodFeature`; default: on
        for ``"residual"``, off for ``"lora"`` and ``"full"``, where its convolutional head
        kept a 256x256 BioSR run busy for over 12 minutes on 2 CPU cores, against 4.3 without),
        ``distance`` ("l2", "pseudo-huber"), ``huber_c``, ``weighting``
        ("kl" is the exact KL, w = sigma; others change the target), ``sigma_min``,
        ``sigma_max``, ``lr``, ``lr_milestones``, ``lr_gamma``, ``init`` ("prior": prior samples, where the auxiliary,
        a copy of the prior at the start, is exact; "noise"; "adjoint"),
        ``init_scale`` and ``data_weight`` (1 targets p(x|y); other values temper the
        likelihood and so target a different distribution).

    Returns
    -------
    Posterior
        ``samples`` of shape ``(n_samples, *operator.in_shape)``, ``mean``, ``std`` and ``history``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if not _is_int(n_samples) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer; got {n_samples!r}")
    if not _is_int(seed):
        raise TypeError(f"seed must be an integer; got {seed!r}")
    if steps is not None and not _is_int(steps):
        raise TypeError(f"steps must be an integer or None; got {steps!r}")
    unknown = set(options) - set(DEFAULTS[method])
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for method {method!r}; allowed: {sorted(DEFAULTS[method])}")
    settings = DEFAULTS[method] | options
    settings["steps"] = settings["steps"] if steps is None else int(steps)
    if settings["steps"] < 1:
        raise ValueError(f"steps must be >= 1; got {settings['steps']}")
    if prior.event_shape is not None and tuple(prior.event_shape) != tuple(operator.in_shape):
        raise ValueError(f"the prior is defined on images of shape {tuple(prior.event_shape)} but the operator's in_shape is {tuple(operator.in_shape)}")

    return _run(y, operator, prior, method, n_samples, seed, callback, settings)


def _run(y: Tensor, operator, prior: Prior, method: str, n_samples: int, seed: int, callback: Callback | None, settings: dict) -> Posterior:
    """Run ``method`` with validated ``settings`` (see :func:`reconstruct`)."""
    n_samples, seed = int(n_samples), int(seed)
    dtype = prior.dtype
    y = prepare_measurement(y, operator).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    logger.info("reconstruct: method=%s n_samples=%d steps=%d", method, n_samples, settings["steps"])

    if method == "dps":
        samples, history = dps(y, operator, prior, n_samples, settings["steps"], generator, settings["zeta"], settings["sigma_min"], settings["sigma_max"], callback, dtype)
        return Posterior(samples, history, method, settings)

    x = initial_particles(settings["init"], n_samples, operator, y, generator, settings["init_scale"], dtype, prior=prior)
    aux = None
    extra_gradient = None
    if method in ("red-diff", "rlsd"):
        schedule = descending_sigmas(settings["steps"], settings["sigma_max"], settings["sigma_min"])
        reg_weight = settings["reg_weight"]
        if reg_weight is None:
            # RED-Diff averages both terms over entries: rescale lambda to our sum-over-entries nll.
            m, d = _numel(operator.out_shape), _numel(operator.in_shape)
            reg_weight = settings["lam"] * m / d / gaussian_noise_std(operator, y) ** 2
        prior_term = red_diff_prior_term(prior, schedule, reg_weight)
        if method == "rlsd":
            extra_gradient = rbf_repulsion(settings["gamma"], schedule)
    else:
        proposal = LogUniformSigma(settings["sigma_min"], settings["sigma_max"])
        aux_kind = settings["aux"] or ("lora" if hasattr(prior, "unet_config") else "residual")
        if aux_kind not in AUX_KINDS:
            raise ValueError(f"aux must be one of {AUX_KINDS}; got {aux_kind!r}")
        settings["aux"] = aux_kind
        feature = None
        if settings["aux_feature"] is not None and not isinstance(settings["aux_feature"], bool):
            raise TypeError(f"aux_feature must be True, False or None; got {settings['aux_feature']!r}")
        if settings["aux_feature"] is None:
            settings["aux_feature"] = aux_kind == "residual"
        if settings["aux_feature"] and aux_kind in ("kde", "gaussian"):
            raise ValueError(f"aux_feature=True needs a trained auxiliary ('residual', 'lora' or 'full'); aux={aux_kind!r} is computed from the particles alone")
        if settings["aux_feature"]:
            curvature = LikelihoodFeature.estimate_curvature(operator, y, x)
            feature = LikelihoodFeature(operator, y, curvature)
            logger.info("likelihood feature: largest nll curvature %.4g", curvature)
        # Seed the auxiliary's weight initialization without touching the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            aux = make_auxiliary(aux_kind, prior, tuple(operator.in_shape), proposal, settings["aux_steps"], settings["aux_lr"], settings["lora_rank"], feature=feature)
        aux = aux.to(dtype) if aux_kind in ("residual", "full", "lora") else aux
        if method == "ikl":
            prior_term = ikl_prior_term(prior, aux, proposal, settings["ikl_weight"])
        else:
            prior_term = ppm_prior_term(
                prior, aux, proposal, weighting(settings["weighting"]), settings["distance"], settings["huber_c"], method == "ppm-sim"
            )

    samples, history = run_particles(
        y,
        operator,
        x,
        prior_term,
        settings["steps"],
        generator,
        lr=settings["lr"],
        lr_milestones=tuple(settings.get("lr_milestones", ())),
        lr_gamma=settings.get("lr_gamma", 1.0),
        data_weight=settings["data_weight"],
        aux=aux,
        callback=callback,
        extra_gradient=extra_gradient,
    )
    diagnostics = {}
    if aux is not None and hasattr(aux, "trainable_parameters"):
        fit = auxiliary_fit(aux, prior, samples, proposal, generator)
        diagnostics["auxiliary fit"] = fit
        logger.info("auxiliary fit (denoising error / prior's, per noise band): %s", ", ".join(f"{k}: {v:.3f}" for k, v in fit.items()))
    return Posterior(samples, history, method, settings, diagnostics)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _numel(shape) -> int:
    total = 1
    for size in shape:
        total *= int(size)
    return total
