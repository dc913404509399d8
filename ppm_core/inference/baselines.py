"""Baselines on the same prior interface: RED-Diff, RLSD, IKL (Diff-Instruct) and DPS.

Each is scaled to our units: the data term is the operator's negative log-likelihood (for
Gaussian noise ``||y - A x||^2 / (2 noise_std^2)``) and the prior works in the VE (EDM)
parametrization ``x_sigma = x0 + sigma eps``.

Defaults: RED-Diff's ``lam = 0.25`` and Adam learning rate 0.1 are its official values; DPS's
``zeta = 0.5`` lies in the original's range of 0.3 to 1.0. RLSD's ``gamma = 1`` and IKL's
log-uniform noise-level weighting with ``ikl_weight = 1`` are our choices, because those papers
tune them per task.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..priors.base import Prior
from ..sampling import karras_sigmas
from .auxiliary import Auxiliary
from .common import Callback, DivergenceError, LogUniformSigma, check_finite, report


def descending_sigmas(steps: int, sigma_max: float, sigma_min: float) -> Tensor:
    """Log-linear schedule from ``sigma_max`` down to ``sigma_min`` over ``steps`` iterations."""
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64))


def gaussian_noise_std(operator, y: Tensor | None = None) -> float:
    """Return the operator's noise standard deviation as a float.

    For Gaussian noise this is ``noise_std``. For a noise model whose variance depends on the
    signal (it has a ``variance(Ax)`` method), it is the root-mean-square noise level at the
    measurement, ``sqrt(mean(variance(y)))``. Other noise models raise ``ValueError``.
    """
    noise = getattr(operator, "noise", None)
    noise_std = getattr(noise, "noise_std", None)
    if noise_std is None and y is not None and hasattr(noise, "variance"):
        return float(noise.variance(y.detach()).mean().sqrt())
    if noise_std is None or torch.as_tensor(noise_std).numel() != 1:
        raise ValueError(
            "this method scales its regularization by the Gaussian noise_std of the operator, which it could not find "
            f"(noise model: {type(noise).__name__}); pass reg_weight= explicitly"
        )
    return float(torch.as_tensor(noise_std))


def red_diff_prior_term(prior: Prior, schedule: Tensor, reg_weight: float):
    """RED-Diff regularizer (Mardani et al. 2023): ``reg_weight * sg(x - D_p(x + sigma_t eps, sigma_t))^T x``.

    Its gradient ``reg_weight * (x - D_p)`` is RED-Diff's ``lambda w_t (eps_hat - eps)`` with
    ``w_t = sigma_t`` in the VE parametrization. ``sigma_t`` follows ``schedule`` (high to low).
    """

    def term(x: Tensor, iteration: int, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        sigma = torch.full((x.shape[0],), float(schedule[iteration]), dtype=x.dtype, device=x.device)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        with torch.no_grad():
            denoised = prior.denoiser(x + sigma.reshape(-1, 1, 1, 1) * eps, sigma)
        return reg_weight * ((x.detach() - denoised) * x).flatten(1).sum(1), {"sigma": float(schedule[iteration])}

    return term


def rbf_repulsion(gamma: float, schedule: Tensor):
    """SVGD-style repulsion of RLSD (Zilberstein et al. 2024), scaled by ``gamma * sigma_t``.

    Adds ``-gamma sigma_t (1/N) sum_j grad_{x_j} k(x_j, x_i)`` to each particle's loss gradient
    (pushing particles apart) with an RBF kernel whose bandwidth follows the median heuristic.
    """

    def gradient(x: Tensor, iteration: int) -> Tensor | None:
        n = x.shape[0]
        if n < 2:
            return None
        flat = x.reshape(n, -1)
        sq_dist = torch.cdist(flat, flat) ** 2
        bandwidth = sq_dist.median().clamp_min(1e-12) / math.log(n + 1)
        kernel = torch.exp(-sq_dist / bandwidth)
        # sum_j grad_{x_j} k(x_j, x_i) = sum_j (2 / h) (x_i - x_j) k_ij
        repulsion = (2 / bandwidth) * (kernel.sum(1, keepdim=True) * flat - kernel @ flat)
        return (-gamma * float(schedule[iteration]) / n * repulsion).reshape(x.shape)

    return gradient


def ikl_prior_term(prior: Prior, aux: Auxiliary, proposal: LogUniformSigma, weight: float):
    """IKL / Diff-Instruct gradient: ``E_sigma (s_phi - s_p)(x_sigma)`` pushed into ``x0`` with no network Jacobian.

    ``sigma`` is drawn from ``proposal`` (log-uniform), which weights every octave of noise
    level equally; ``weight`` scales the whole term.
    """

    def term(x: Tensor, iteration: int, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        sigma = proposal.sample(x.shape[0], generator, dtype=x.dtype).to(x.device)
        sigma_b = sigma.reshape(-1, 1, 1, 1)
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x_sigma = x + sigma_b * eps
        with torch.no_grad():
            score_gap = (aux.denoiser(x_sigma, sigma) - prior.denoiser(x_sigma, sigma)) / sigma_b**2
        return weight * (score_gap * x_sigma).flatten(1).sum(1), {}

    return term


def dps(
    y: Tensor,
    operator,
    prior: Prior,
    n_samples: int,
    steps: int,
    generator: torch.Generator,
    zeta: float = 0.5,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    callback: Callback | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, dict[str, list[float]]]:
    """Diffusion posterior sampling (Chung et al. 2023) with an ancestral Euler sampler.

    After each reverse step, ``x -= zeta * grad_x ||y - A(D_p(x, sigma))||`` (unsquared norm,
    as in the original, whose ``zeta`` ranged from 0.3 to 1.0 by task). An operator with a
    ``dps_residual(x, y)`` method (a likelihood that is not Gaussian in ``y - A(x)``) supplies
    the norm instead.
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2; got {steps}")
    sigmas = karras_sigmas(steps, sigma_min, sigma_max)
    x = sigmas[0] * torch.randn((n_samples, *operator.in_shape), generator=generator, dtype=torch.float64)
    x = x.to(dtype)
    history: dict[str, list[float]] = {"residual norm": []}
    for i in range(steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])

        # Denoise and measure the residual of the denoised estimate.
        x = x.detach().requires_grad_(True)
        denoised = prior.denoiser(x, sigma)
        if hasattr(operator, "dps_residual"):  # operators with a non-Gaussian likelihood give a weighted norm
            residual = operator.dps_residual(denoised, y)
        else:
            residual = (y - operator.A(denoised)).flatten(1).norm(dim=1)
        (grad,) = torch.autograd.grad(residual.sum(), x)
        check_finite({"residual norm": residual.detach()}, i, {"residual norm": "lower 'zeta' or check y and the operator"})

        # Ancestral step sigma -> sigma_next, then the measurement-guidance step.
        with torch.no_grad():
            sigma_up = min(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
            sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
            d = (x - denoised) / sigma
            x = x + d * (sigma_down - sigma)
            if sigma_next > 0:
                x = x + sigma_up * torch.randn(x.shape, generator=generator, dtype=torch.float64).to(dtype)
            x = x - zeta * grad
        if not bool(torch.isfinite(x).all()):
            raise DivergenceError(f"DPS samples became NaN or infinite at step {i}; lower 'zeta' (now {zeta})")
        history["residual norm"].append(float(residual.detach().mean()))
        report(callback, {"iteration": i + 1, "steps": steps, "losses": {"residual norm": history["residual norm"][-1]}, "mean": x.detach().mean(0)})
    return x.detach(), history
