"""The prior contract shared by network and analytic priors."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def as_sigma(sigma: float | Tensor, x: Tensor) -> Tensor:
    """Return ``sigma`` as a ``(batch, 1, 1, 1)`` tensor on the device and dtype of ``x``.

    Parameters
    ----------
    sigma : float or (batch,) tensor
        Diffusion noise level, one value for the batch or one per item.
    x : (batch, C, H, W) tensor
    """
    batch = x.shape[0]
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(batch)
    sigma = sigma.reshape(-1)
    if sigma.shape[0] != batch:
        raise ValueError(
            f"sigma must be a float or a (batch,) tensor with batch={batch}; got shape {tuple(sigma.shape)}"
        )
    if not bool(torch.all(sigma > 0)):
        raise ValueError(f"sigma must be positive; got min {float(sigma.min()):.3g}")
    return sigma.reshape(batch, 1, 1, 1)


class Prior(nn.Module):
    """A diffusion prior in the variance-exploding (EDM) parametrization.

    ``x_sigma = x0 + sigma * eps``. Subclasses implement :meth:`denoiser`, the posterior mean
    ``E[x0 | x_sigma]``; the score follows from Tweedie's formula.
    """

    #: shape ``(C, H, W)`` the prior is defined on, or ``None`` when any size is accepted
    event_shape: tuple[int, int, int] | None = None

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the prior's parameters or buffers (float32 when it has none)."""
        for tensor in list(self.parameters()) + list(self.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32

    def denoiser(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Return ``D(x, sigma) = E[x0 | x_sigma = x]``, shape of ``x``."""
        raise NotImplementedError

    def score(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Return ``grad log p_sigma(x) = (D(x, sigma) - x) / sigma**2``, shape of ``x``."""
        self.check_input(x)
        sigma_b = as_sigma(sigma, x)
        return (self.denoiser(x, sigma) - x) / sigma_b**2

    def check_input(self, x: Tensor, name: str = "x") -> None:
        """Raise ``ValueError``/``TypeError`` when ``x`` cannot be fed to this prior."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype (float32 or float64); got {x.dtype}")
        if x.ndim != 4:
            raise ValueError(f"{name} must have shape (batch, C, H, W); got {tuple(x.shape)}")
        if self.event_shape is not None and tuple(x.shape[1:]) != tuple(self.event_shape):
            raise ValueError(
                f"{name} must have shape (batch, {', '.join(map(str, self.event_shape))}) to match "
                f"the prior; got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        return self.denoiser(x, sigma)
