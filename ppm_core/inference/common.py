"""Shared pieces of the inference methods: results, callbacks, noise-level proposals, checks."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

#: ``callback(state) -> bool | None``; returning ``True`` cancels the run.
Callback = Callable[[dict], "bool | None"]


class ReconstructionCancelled(RuntimeError):
    """Raised when a callback requests that a reconstruction stop. The inputs are left untouched."""


class DivergenceError(FloatingPointError):
    """Raised when a loss term or the samples become NaN, infinite or explode."""


@dataclass
class Posterior:
    """Posterior samples and their summaries.

    Attributes
    ----------
    samples : (n, C, H, W) tensor
        Posterior samples (particles for particle methods, independent runs otherwise).
    history : dict of lists
        Per-iteration values of each loss term and diagnostic, keyed by name.
    method : str
    options : dict
        The settings the run used, defaults included.
    diagnostics : dict
        End-of-run checks. For methods with a trained auxiliary score, ``"auxiliary fit"`` maps
        noise bands to the auxiliary's denoising error on fresh noisy copies of the final samples
        relative to the prior's (see :func:`~ppm_core.inference.auxiliary.auxiliary_fit`).
    """

    samples: Tensor
    history: dict[str, list[float]] = field(default_factory=dict)
    method: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> Tensor:
        """Pixel-wise posterior mean, shape ``(C, H, W)``."""
        return self.samples.mean(dim=0)

    @property
    def std(self) -> Tensor:
        """Pixel-wise posterior standard deviation (unbiased), shape ``(C, H, W)``; zero for one sample."""
        if self.samples.shape[0] < 2:
            return torch.zeros_like(self.samples[0])
        return self.samples.std(dim=0)

    def quantiles(self, q: float | list[float]) -> Tensor:
        """Pixel-wise empirical quantiles of the samples, shape ``(len(q), C, H, W)``."""
        q_t = torch.as_tensor(q, dtype=self.samples.dtype).reshape(-1)
        return torch.quantile(self.samples, q_t, dim=0)


@dataclass(frozen=True)
class LogUniformSigma:
    """Noise-level proposal ``pi(sigma) = 1 / (sigma ln(sigma_max / sigma_min))`` on ``[sigma_min, sigma_max]``."""

    sigma_min: float = 0.01
    sigma_max: float = 20.0

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max; got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")

    @property
    def log_range(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def sample(self, n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return torch.exp(math.log(self.sigma_min) + u * self.log_range).to(dtype)

    def density(self, sigma: Tensor) -> Tensor:
        return 1.0 / (sigma * self.log_range)


# Weightings w(sigma) of the Fisher-divergence integral. Only "kl" (w = sigma) gives KL(q || p);
# the others define other divergences and so a different (tempered-like) target.
WEIGHTINGS: dict[str, Callable[[Tensor], Tensor]] = {
    "kl": lambda sigma: sigma,
    "sigma2": lambda sigma: sigma**2,
    "sigma3": lambda sigma: sigma**3,
}


def weighting(name: str) -> Callable[[Tensor], Tensor]:
    if name not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {sorted(WEIGHTINGS)}; got {name!r}")
    return WEIGHTINGS[name]


def check_finite(terms: dict[str, Tensor | float], iteration: int, hints: dict[str, str]) -> None:
    """Raise :class:`DivergenceError` naming the first non-finite term and what to try."""
    for name, value in terms.items():
        if not bool(torch.isfinite(torch.as_tensor(value)).all()):
            hint = hints.get(name, "lower the learning rate 'lr'")
            raise DivergenceError(f"{name} became NaN or infinite at iteration {iteration}; {hint}")


def prepare_measurement(y: Tensor, operator: Any) -> Tensor:
    """Validate ``y`` against the operator and return it with a batch axis of one."""
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor; got {type(y).__name__}")
    out_shape = tuple(operator.out_shape)
    if tuple(y.shape) == out_shape:
        y = y.unsqueeze(0)
    if y.ndim != len(out_shape) + 1 or tuple(y.shape[1:]) != out_shape or y.shape[0] != 1:
        raise ValueError(f"y must have shape {out_shape} or (1, {', '.join(map(str, out_shape))}) to match the operator; got {tuple(y.shape)}")
    if not y.is_floating_point():
        raise TypeError(f"y must have a floating dtype; got {y.dtype}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError("y contains NaN or infinite values")
    return y


def data_nll(operator: Any, x: Tensor, y: Tensor) -> Tensor:
    """Negative log-likelihood of one measurement ``y`` for each image of ``x``, shape ``(n,)``."""
    return operator.nll(x, y.expand(x.shape[0], *y.shape[1:]))


def report(callback: Callback | None, state: dict) -> None:
    """Send ``state`` to the callback and raise :class:`ReconstructionCancelled` if it requests a stop."""
    if callback is not None and callback(state):
        raise ReconstructionCancelled(f"reconstruction cancelled at iteration {state.get('iteration')}")
