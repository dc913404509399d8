"""Network priors: EDM preconditioning around a U-Net, and safetensors checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..io import atomic_path
from .base import Prior, as_sigma
from .unet import UNet, UNetConfig

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
#: Ways of mapping raw intensities to a prior's space; see ``ppm_core.training.data.normalization_params``.
NORMALIZATION_METHODS = ("percentile", "fixed", "none")


class DiffusionPrior(Prior):
    """EDM-preconditioned denoiser ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``.

    The prior works in its normalized intensity space (``normalization`` records how training
    images were mapped there). Any image size is accepted: height and width that are not
    multiples of the U-Net's downsampling factor are reflect-padded and the output cropped.

    Parameters
    ----------
    unet_config : UNetConfig
        Architecture of the network ``F``.
    sigma_data : float
        Standard deviation of the normalized training images (EDM's ``sigma_data``).
    normalization : dict, optional
        How raw intensities map to the prior's space; see :mod:`ppm_core.training.data`.
    data_description : dict, optional
        What the prior was trained on (free-form, stored in the config).
    """

    def __init__(
        self,
        unet_config: UNetConfig | None = None,
        sigma_data: float = 0.5,
        normalization: dict | None = None,
        data_description: dict | None = None,
    ):
        super().__init__()
        self.unet_config = unet_config or UNetConfig()
        self.sigma_data = float(sigma_data)
        self.normalization = dict(normalization or {"method": "none"})
        self.data_description = dict(data_description or {})
        self.net = UNet(self.unet_config)

    @property
    def in_channels(self) -> int:
        return self.unet_config.in_channels

    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``(c_skip, c_out, c_in, c_noise)`` for a ``(batch, 1, 1, 1)`` sigma (Karras et al. 2022, Table 1)."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def check_input(self, x: Tensor, name: str = "x") -> None:
        super().check_input(x, name)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{name} must have {self.in_channels} channel(s) to match the prior; got shape {tuple(x.shape)}"
            )

    def denoiser(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        self.check_input(x)
        sigma_b = as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma_b)

        # Pad to a multiple of the downsampling factor; reflect keeps image statistics at the edge.
        height, width = x.shape[-2:]
        factor = self.unet_config.downsampling_factor
        pad_h, pad_w = (-height) % factor, (-width) % factor
        x_in = c_in * x
        if pad_h or pad_w:
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            x_in = F.pad(x_in, (0, pad_w, 0, pad_h), mode=mode)
        net_dtype = next(self.net.parameters()).dtype
        f_x = self.net(x_in.to(net_dtype), c_noise.reshape(-1).to(net_dtype)).to(x.dtype)
        f_x = f_x[..., :height, :width]
        return c_skip * x + c_out * f_x

    # ----------------------------------------------------------------------------------------
    # Intensity normalization

    def normalize(self, image: Tensor, reference: Tensor | None = None) -> tuple[Tensor, dict]:
        """Map raw intensities to the prior's space; return the image and the parameters used.

        For ``"percentile"`` normalization the percentiles are taken from ``reference``
        (default ``image``); the returned dict lets :meth:`denormalize` undo the map.
        """
        from ..training.data import normalization_params

        params = normalization_params(self.normalization, image if reference is None else reference)
        return (image - params["offset"]) / params["scale"], params

    @staticmethod
    def denormalize(image: Tensor, params: dict) -> Tensor:
        """Invert :meth:`normalize` with the parameters it returned."""
        return image * params["scale"] + params["offset"]

    # ----------------------------------------------------------------------------------------
    # Checkpoints

    def config_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "edm-unet",
            "architecture": self.unet_config.to_dict(),
            "sigma_data": self.sigma_data,
            "normalization": self.normalization,
            "training_data": self.data_description,
        }

    def save(self, directory: str | os.PathLike, extra_config: dict | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory``, each atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.net.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        config = self.config_dict() | dict(extra_config or {})
        with atomic_path(directory / CONFIG_NAME) as tmp:
            tmp.write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def from_config(cls, config: dict) -> DiffusionPrior:
        if config.get("kind") != "edm-unet":
            raise ValueError(f"config 'kind' must be 'edm-unet'; got {config.get('kind')!r}")
        try:
            unet_config = UNetConfig(**config["architecture"])
            sigma_data = float(config["sigma_data"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"prior config is missing or has invalid 'architecture'/'sigma_data': {exc!r}") from exc
        unet_config.validate()
        if not (math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(f"prior config 'sigma_data' must be a positive finite number; got {config['sigma_data']!r}")
        method = (config.get("normalization") or {}).get("method", "none")
        if method not in NORMALIZATION_METHODS:
            raise ValueError(f"prior config normalization method must be one of {NORMALIZATION_METHODS}; got {method!r}")
        return cls(unet_config, sigma_data, config.get("normalization"), config.get("training_data"))


def read_config(directory: str | os.PathLike) -> dict:
    """Read a checkpoint's JSON config, raising ``ValueError`` when it is missing or invalid."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"prior config not found: {path} (a prior is a folder with {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"prior config {path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"prior config {path} must be a JSON object; got {type(config).__name__}")
    return config


def load_prior(directory: str | os.PathLike, device: str | torch.device = "cpu") -> DiffusionPrior:
    """Load a network prior from a folder holding ``config.json`` and ``model.safetensors``.

    Weights are read with safetensors, never unpickled. Raises ``FileNotFoundError`` when a
    file is missing and ``ValueError`` when a file is corrupt or does not match the config.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"prior folder not found: {directory}")
    prior = DiffusionPrior.from_config(read_config(directory))
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"prior weights not found: {weights_path}")
    try:
        state = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"prior weights {weights_path} are corrupt or not a safetensors file: {exc}") from exc
    expected = {k: tuple(v.shape) for k, v in prior.net.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        mismatched = sorted(set(expected) ^ set(found)) or [k for k in expected if expected[k] != found[k]]
        raise ValueError(
            f"prior weights {weights_path} do not match the architecture in {CONFIG_NAME}: "
            f"{len(mismatched)} tensor(s) differ, first {mismatched[0]!r} (expected {expected.get(mismatched[0])}, found {found.get(mismatched[0])})"
        )
    prior.net.load_state_dict(state, strict=True)
    non_finite = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if non_finite:
        raise ValueError(f"prior weights {weights_path} contain NaN or infinite values in {non_finite[:3]}")
    logger.info("loaded prior from %s (%d parameters)", directory, sum(v.numel() for v in state.values()))
    return prior.to(device).eval().requires_grad_(False)


