"""Posterior inference: PPM particle VI and baselines on the same prior interface."""

from .amortized import AmortizedModel, load_amortized
from .api import DEFAULTS, METHODS, reconstruct
from .auxiliary import AUX_KINDS, GaussianFitAuxiliary, KernelDensityAuxiliary, NetworkAuxiliary, ResidualAuxiliary
from .common import DivergenceError, LogUniformSigma, Posterior, ReconstructionCancelled
from .ppm import ppm_surrogate

__all__ = [
    "AUX_KINDS",
    "AmortizedModel",
    "DEFAULTS",
    "METHODS",
    "DivergenceError",
    "GaussianFitAuxiliary",
    "KernelDensityAuxiliary",
    "LogUniformSigma",
    "NetworkAuxiliary",
    "Posterior",
    "ReconstructionCancelled",
    "ResidualAuxiliary",
    "load_amortized",
    "ppm_surrogate",
    "reconstruct",
]
