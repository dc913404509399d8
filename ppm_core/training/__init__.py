"""Training network priors by denoising score matching."""

from .amortized import AmortizedConfig, train_amortized
from .data import SYNTHETIC_GENERATORS, FolderSource, ImageSource, SyntheticSource, register_generator
from .train import TrainConfig, edm_loss, train_prior

__all__ = [
    "SYNTHETIC_GENERATORS",
    "AmortizedConfig",
    "FolderSource",
    "ImageSource",
    "SyntheticSource",
    "TrainConfig",
    "edm_loss",
    "register_generator",
    "train_amortized",
    "train_prior",
]
