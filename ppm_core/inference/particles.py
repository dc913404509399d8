"""The shared particle loop: Adam on N images, data term plus a method's prior term."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import Tensor

from ..sampling import edm_sampler
from .auxiliary import Auxiliary
from .common import Callback, DivergenceError, check_finite, data_nll, report

logger = logging.getLogger(__name__)

#: ``prior_term(x, iteration, generator) -> ((n,) tensor, diagnostics)``
PriorTerm = Callable[[Tensor, int, torch.Generator], "tuple[Tensor, dict[str, float]]"]

HINTS = {
    "data term": "check that y and the operator's noise level match, or lower 'lr'",
    "prior term": "lower 'lr' or raise 'sigma_min'",
    "auxiliary loss": "lower 'aux_lr' or raise 'sigma_min'",
    "particles": "lower 'lr'",
}


def initial_particles(
    init: str,
    n: int,
    operator,
    y: Tensor,
    generator: torch.Generator,
    init_scale: float,
    dtype: torch.dtype,
    prior=None,
    prior_sampler_steps: int = 32,
) -> Tensor:
    """Starting particles, shape ``(n, *operator.in_shape)``.

    ``"prior"``: samples of the prior from the EDM sampler (``init_scale`` is not used).
    ``"noise"``: ``init_scale * N(0, I)``. ``"adjoint"``: ``alpha A^T y`` plus that noise, with
    ``alpha`` the least-squares scale that makes ``A(alpha A^T y)`` closest to ``y`` (plain
    ``A^T y`` is badly scaled for averaging operators).
    """
    shape = (n, *operator.in_shape)
    if init == "prior":
        # q starts at the prior, where an auxiliary initialized as the prior is exact.
        samples = edm_sampler(prior, shape, steps=prior_sampler_steps, generator=generator).to(dtype)
        if not bool(torch.isfinite(samples).all()):
            raise DivergenceError("the prior's sampler returned NaN or infinite values for init='prior'; check the prior, or use init='noise'")
        return samples
    noise = init_scale * torch.randn(shape, generator=generator, dtype=dtype)
    if init == "noise":
        return noise
    if init == "adjoint":
        if not hasattr(operator, "A_adjoint"):
            raise ValueError("init='adjoint' needs a linear operator with A_adjoint; use init='noise'")
        with torch.no_grad():
            back = operator.A_adjoint(y.to(dtype))
            forward = operator.A(back)
            alpha = (forward * y).sum() / (forward**2).sum().clamp_min(1e-30)
        return alpha * back + noise
    raise ValueError(f"init must be 'prior', 'noise' or 'adjoint'; got {init!r}")


def run_particles(
    y: Tensor,
    operator,
    x: Tensor,
    prior_term: PriorTerm,
    steps: int,
    generator: torch.Generator,
    lr: float,
    lr_milestones: tuple[float, ...] = (0.5, 0.75),
    lr_gamma: float = 0.3,
    data_weight: float = 1.0,
    aux: Auxiliary | None = None,
    callback: Callback | None = None,
    extra_gradient: Callable[[Tensor, int], Tensor | None] | None = None,
) -> tuple[Tensor, dict[str, list[float]]]:
    """Optimize particles ``x`` with Adam on ``data_weight * nll(x) + prior_term(x)``.

    Each iteration first updates the auxiliary (if any) to the current particles, then takes one
    particle step with the auxiliary frozen. The learning rate is multiplied by ``lr_gamma`` at
    each fraction of ``steps`` in ``lr_milestones``.

    Returns
    -------
    x : (n, C, H, W) tensor
        Final particles.
    history : dict
        Per-iteration mean of each loss term and diagnostic.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if lr <= 0:
        raise ValueError(f"lr must be positive; got {lr}")
    x = x.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    milestones = {max(1, int(round(m * steps))) for m in lr_milestones}
    history: dict[str, list[float]] = {}
    start = time.perf_counter()

    for iteration in range(steps):
        # Stage 1: fit the auxiliary score to the current particles.
        diagnostics: dict[str, float] = {}
        aux_loss = aux.fit(x.detach(), generator) if aux is not None else None
        if aux_loss is not None:
            diagnostics["auxiliary loss"] = aux_loss

        # Stage 2: one particle step with the auxiliary frozen.
        if aux is not None:
            with aux.frozen():
                prior, extra = prior_term(x, iteration, generator)
        else:
            prior, extra = prior_term(x, iteration, generator)
        data = data_nll(operator, x, y)
        loss = (data_weight * data + prior).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if extra_gradient is not None:
            added = extra_gradient(x.detach(), iteration)
            if added is not None:
                x.grad.add_(added)
        optimizer.step()
        if iteration + 1 in milestones:
            for group in optimizer.param_groups:
                group["lr"] *= lr_gamma

        # Bookkeeping, divergence checks and the callback.
        terms = {"data term": data.detach().mean(), "prior term": prior.detach().mean()} | diagnostics
        terms |= extra
        check_finite(terms | {"particles": x.detach()}, iteration, HINTS)
        if float(x.detach().abs().max()) > 1e8:
            raise DivergenceError(f"particles exploded (max |x| > 1e8) at iteration {iteration}; {HINTS['particles']}")
        for name, value in terms.items():
            history.setdefault(name, []).append(float(value))
        state = {"iteration": iteration + 1, "steps": steps, "losses": {k: float(v) for k, v in terms.items()}, "mean": x.detach().mean(0)}
        report(callback, state)

    logger.info("particle run finished: %d steps, %d particles, %.1f s", steps, x.shape[0], time.perf_counter() - start)
    return x.detach(), history
