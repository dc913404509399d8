"""Training network priors by denoising score matching."""

from .data import SYNTHETIC_GENERATORS, FolderSource, ImageSource, SyntheticSource, register_generator
from .train import TrainConfig, edm_loss, train_prior

__all__ = [
    "SYNTHETIC_GENERATORS",
    "FolderSource",
    "ImageSource",
    "SyntheticSource",
    "TrainConfig",
    "edm_loss",
    "register_generator",
    "train_prior",
]
