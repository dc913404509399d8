"""Diffusion priors: network priors with EDM preconditioning and analytic test oracles."""

from .analytic import GaussianMixturePrior, GaussianPrior
from .base import Prior, as_sigma
from .network import DiffusionPrior, load_prior
from .unet import UNet, UNetConfig

__all__ = [
    "DiffusionPrior",
    "GaussianMixturePrior",
    "GaussianPrior",
    "Prior",
    "UNet",
    "UNetConfig",
    "as_sigma",
    "load_prior",
]
