"""Principled Posterior Matching: particle VI with the exact gradient of the diffusion KL.

For particles ``x0`` and the diffused samples ``x_sigma = x0 + sigma eps``, the prior's KL term
is ``KL(q || p) = ∫ w(sigma) E||s_q - s_p||^2 dsigma`` with ``w(sigma) = sigma``. With an
auxiliary ``s_phi ≈ s_q`` held fixed, ``c = -eps / sigma`` and ``u = d'(s_p - s_phi)``, the
gradient of ``E d(s_p - s_q)`` equals in expectation the gradient of

    L_sigma = d(s_p - s_phi) + u^T (s_phi - c)

taken through ``x_sigma`` into both networks (Theorem 1 of the PPM paper). For the L2 distance
this is the difference of denoising errors ``(||D_p - x0||^2 - ||D_phi - x0||^2) / sigma^4``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..priors.base import Prior
from .auxiliary import Auxiliary
from .common import LogUniformSigma

DISTANCES = ("l2", "pseudo-huber")


def ppm_surrogate(
    x0: Tensor,
    sigma: Tensor,
    eps: Tensor,
    prior: Prior,
    aux: Auxiliary | Prior,
    distance: str = "l2",
    huber_c: float = 1.0,
    first_network_only: bool = False,
) -> Tensor:
    """Per-sample surrogate ``L_sigma`` whose gradient in ``x0`` is the PPM gradient, shape ``(n,)``.

    Parameters
    ----------
    x0 : (n, C, H, W) tensor
        Samples (with gradients to the variational parameters).
    sigma : (n,) tensor
        Noise level of each sample.
    eps : (n, C, H, W) tensor
        Standard normal noise; ``x_sigma = x0 + sigma * eps``.
    prior, aux : prior and auxiliary denoisers; the auxiliary's parameters must be frozen.
    distance : {"l2", "pseudo-huber"}
        ``d(v) = ||v||^2``, or ``sqrt(||v||^2 + c_h^2) - c_h`` with
        ``c_h = huber_c * sqrt(dim) / sigma`` (the norm of ``c`` at that noise level, our choice).
    first_network_only : bool
        Keep only ``sg(u)^T s_p`` (the "SIM-style" ablation), which is biased in the spread direction.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}; got {distance!r}")
    sigma_b = sigma.reshape(-1, 1, 1, 1)
    x_sigma = x0 + sigma_b * eps
    prior_denoised = prior.denoiser(x_sigma, sigma)
    aux_denoised = aux.denoiser(x_sigma, sigma)

    # Scores relative to c = -eps / sigma: s - c = (D - x0) / sigma^2.
    prior_gap = (prior_denoised - x0) / sigma_b**2
    aux_gap = (aux_denoised - x0) / sigma_b**2
    v = prior_gap - aux_gap  # s_p - s_phi

    if distance == "l2":
        if first_network_only:
            s_p = (prior_denoised - x_sigma) / sigma_b**2
            return (2 * v.detach() * s_p).flatten(1).sum(1)
        return prior_gap.pow(2).flatten(1).sum(1) - aux_gap.pow(2).flatten(1).sum(1)

    dim = x0[0].numel()
    c_h = huber_c * dim**0.5 / sigma
    norm = (v.pow(2).flatten(1).sum(1) + c_h**2).sqrt()
    u = v / norm.reshape(-1, 1, 1, 1)
    if first_network_only:
        s_p = (prior_denoised - x_sigma) / sigma_b**2
        return (u.detach() * s_p).flatten(1).sum(1)
    return (norm - c_h) + (u * aux_gap).flatten(1).sum(1)


def ppm_prior_term(
    prior: Prior,
    aux: Auxiliary,
    proposal: LogUniformSigma,
    weighting,
    distance: str,
    huber_c: float,
    first_network_only: bool,
):
    """Return the particle loop's prior term: ``w(sigma) / pi(sigma) * L_sigma`` per particle."""

    def term(x: Tensor, iteration: int, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        sigma = proposal.sample(x.shape[0], generator, dtype=x.dtype).to(x.device)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        surrogate = ppm_surrogate(x, sigma, eps, prior, aux, distance, huber_c, first_network_only)
        importance = weighting(sigma) / proposal.density(sigma)
        return importance * surrogate, {}

    return term
