"""Unconditional sampling from a diffusion prior (EDM's deterministic Heun sampler)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .priors.base import Prior


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Return ``n`` noise levels from ``sigma_max`` down to ``sigma_min`` with a trailing 0 (Karras et al. 2022, eq. 5)."""
    if n < 2:
        raise ValueError(f"n must be >= 2; got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_rho = 1 / rho
    sigmas = (sigma_max**inv_rho + ramp * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@torch.no_grad()
def edm_sampler(
    prior: Prior,
    shape: tuple[int, int, int, int],
    steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    callback: Callable[[dict], bool | None] | None = None,
) -> Tensor:
    """Draw samples of the prior by integrating the probability-flow ODE with Heun's method.

    Parameters
    ----------
    prior : Prior
    shape : (n, C, H, W)
        Shape of the batch of samples to draw.
    steps : int
        Number of noise levels; the sampler makes ``2 * steps - 1`` denoiser evaluations.
    callback : callable, optional
        Called after each step with ``{"i", "steps", "sigma", "x", "denoised"}``; returning
        ``True`` stops sampling and returns the current denoised estimate.

    Returns
    -------
    (n, C, H, W) tensor
        Samples in the prior's normalized space.
    """
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho).to(device)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).to(device) * sigmas[0]
    dtype = prior.dtype
    for i, (sigma_cur, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        # Euler step along dx/dsigma = (x - D(x, sigma)) / sigma.
        denoised = prior.denoiser(x.to(dtype), float(sigma_cur)).to(x.dtype)
        d_cur = (x - denoised) / sigma_cur
        x_next = x + (sigma_next - sigma_cur) * d_cur

        # Heun correction, except at the last step where sigma_next = 0.
        if sigma_next > 0:
            denoised_next = prior.denoiser(x_next.to(dtype), float(sigma_next)).to(x.dtype)
            d_next = (x_next - denoised_next) / sigma_next
            x_next = x + (sigma_next - sigma_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
        if callback is not None and callback({"i": i, "steps": steps, "sigma": float(sigma_cur), "x": x, "denoised": denoised}):
            return denoised.to(dtype)
    return x.to(dtype)
