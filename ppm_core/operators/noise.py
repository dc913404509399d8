"""Measurement noise models: the likelihood ``p(y | A(x))`` and how to sample from it.

A noise model is a small :class:`torch.nn.Module`, so its parameters move with the operator that
owns it under ``.to(device)``. Every model provides

- ``nll(y, Ax, mask=None)``: the negative log-likelihood of ``y`` given the noiseless measurement
  ``Ax``, summed over all entries of one batch item, a ``(batch,)`` tensor;
- ``sample(Ax, generator=None)``: a draw of ``y`` given ``Ax``.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["NoiseModel", "GaussianNoise", "PoissonGaussianNoise", "anscombe", "make_noise"]


class NoiseModel(torch.nn.Module, ABC):
    """Base class of measurement noise models.

    Subclasses implement :meth:`nll_entries` (the per-entry negative log-likelihood) and
    :meth:`sample`. :meth:`nll` sums the entries of each batch item.
    """

    @abstractmethod
    def nll_entries(self, y: Tensor, Ax: Tensor) -> Tensor:
        """Compute the negative log-likelihood of each entry of ``y``.

        Parameters
        ----------
        y : (batch, C, H, W) tensor
            Measurement. A batch of 1 broadcasts against the batch of ``Ax``.
        Ax : (batch, C, H, W) tensor
            Noiseless measurement ``A(x)``.

        Returns
        -------
        (batch, C, H, W) tensor
            Per-entry negative log-likelihood, up to the constant that the subclass documents.
        """

    @abstractmethod
    def sample(self, Ax: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw a measurement ``y`` given the noiseless measurement ``Ax`` (same shape)."""

    def nll(self, y: Tensor, Ax: Tensor, mask: Tensor | None = None) -> Tensor:
        """Compute the negative log-likelihood of ``y`` given ``Ax``, summed per batch item.

        Parameters
        ----------
        y : (batch, C, H, W) tensor
            Measurement. A batch of 1 broadcasts against the batch of ``Ax``.
        Ax : (batch, C, H, W) tensor
            Noiseless measurement ``A(x)``.
        mask : tensor broadcastable to ``Ax``, optional
            Entries where ``mask`` is nonzero are observed. The others are left out of the sum,
            so their values in ``y`` do not matter.

        Returns
        -------
        (batch,) tensor
        """
        entries = self.nll_entries(y, Ax)
        if mask is not None:
            # torch.where, not a product, so that an infinite term at an unobserved entry is dropped.
            entries = torch.where(mask.to(torch.bool), entries, torch.zeros_like(entries))
        return entries.flatten(start_dim=1).sum(dim=1)


class GaussianNoise(NoiseModel):
    """Additive white Gaussian noise, ``y = Ax + noise_std * eps`` with ``eps ~ N(0, I)``.

    Parameters
    ----------
    noise_std : float or tensor
        Standard deviation of the noise, in the units of ``y``. A tensor must contain positive
        finite values and broadcast against one measurement ``(batch, C, H, W)``, for example a
        ``(1, C, 1, 1)`` tensor for one value per channel.

    Notes
    -----
    :meth:`nll` drops the constant ``0.5 * log(2 pi noise_std^2)`` per entry, which does not
    depend on ``x``. :meth:`nll_full` includes it.
    """

    noise_std: Tensor

    def __init__(self, noise_std: float | Tensor):
        super().__init__()
        self.register_buffer("noise_std", _check_noise_std(noise_std))

    def nll_entries(self, y: Tensor, Ax: Tensor) -> Tensor:
        """Compute ``0.5 * (y - Ax)^2 / noise_std^2`` per entry."""
        noise_std = self.noise_std.to(dtype=Ax.dtype)
        return 0.5 * ((y - Ax) / noise_std) ** 2

    def nll_full(self, y: Tensor, Ax: Tensor, mask: Tensor | None = None) -> Tensor:
        """Compute the negative log-likelihood with its normalizing constant, a ``(batch,)`` tensor.

        Parameters and ``mask`` are as in :meth:`nll`.
        """
        noise_std = self.noise_std.to(dtype=Ax.dtype)
        constant = 0.5 * torch.log(2 * math.pi * noise_std**2)
        residual_term = 0.5 * ((y - Ax) / noise_std) ** 2
        entries = residual_term + constant
        if mask is not None:
            entries = torch.where(mask.to(torch.bool), entries, torch.zeros_like(entries))
        return entries.flatten(start_dim=1).sum(dim=1)

    def sample(self, Ax: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``y = Ax + noise_std * eps`` with ``eps ~ N(0, I)``."""
        eps = torch.randn(Ax.shape, generator=generator, dtype=Ax.dtype, device=Ax.device)
        return Ax + self.noise_std.to(dtype=Ax.dtype) * eps

    def extra_repr(self) -> str:
        if self.noise_std.numel() == 1:
            return f"noise_std={self.noise_std.item():g}"
        return f"noise_std=tensor of shape {tuple(self.noise_std.shape)}"


class PoissonGaussianNoise(NoiseModel):
    """Camera noise: ``y = gain * Poisson(Ax) + offset + read_noise_std * eps``, ``eps ~ N(0, 1)``.

    ``Ax`` is the expected photon count per pixel and must be non-negative when sampling.

    Parameters
    ----------
    gain : float
        Camera gain, in measurement units (ADU) per photon. Must be positive.
    offset : float
        Camera offset (baseline), in ADU. It is the mean of the Gaussian part.
    read_noise_std : float
        Standard deviation of the Gaussian read noise, in ADU. Must be non-negative.

    Notes
    -----
    :meth:`nll` is the moment-matched Gaussian approximation of the Poisson-Gaussian likelihood,
    with mean ``gain * Ax + offset`` and variance ``gain^2 * max(Ax, 0) + read_noise_std^2``
    (see :meth:`gaussian_approximation_nll`). It keeps the log-variance term, because the
    variance depends on ``x``, and drops the constant ``0.5 * log(2 pi)`` per entry. The
    approximation is accurate for counts above roughly 10 photons per pixel.

    With ``read_noise_std = 0`` the variance vanishes where ``Ax <= 0``, and the likelihood is
    infinite there. Use a positive ``read_noise_std`` when ``Ax`` can reach zero.
    """

    def __init__(self, gain: float, offset: float = 0.0, read_noise_std: float = 0.0):
        super().__init__()
        self.gain = _check_scalar("gain", gain, minimum=0.0, inclusive=False)
        self.offset = _check_scalar("offset", offset)
        self.read_noise_std = _check_scalar("read_noise_std", read_noise_std, minimum=0.0)

    def variance(self, Ax: Tensor) -> Tensor:
        """Compute the variance of ``y`` given ``Ax``, ``gain^2 * max(Ax, 0) + read_noise_std^2``."""
        return self.gain**2 * Ax.clamp(min=0) + self.read_noise_std**2

    def gaussian_approximation_nll(self, y: Tensor, Ax: Tensor) -> Tensor:
        """Compute the per-entry negative log-likelihood of the moment-matched Gaussian.

        The result is ``0.5 * (y - gain * Ax - offset)^2 / v + 0.5 * log(v)`` with
        ``v = gain^2 * max(Ax, 0) + read_noise_std^2``, a tensor shaped like ``y - Ax``.
        """
        variance = self.variance(Ax)
        residual = y - (self.gain * Ax + self.offset)
        return 0.5 * residual**2 / variance + 0.5 * torch.log(variance)

    def nll_entries(self, y: Tensor, Ax: Tensor) -> Tensor:
        """Compute the Gaussian-approximation negative log-likelihood per entry.

        This is :meth:`gaussian_approximation_nll`.
        """
        return self.gaussian_approximation_nll(y, Ax)

    def sample(self, Ax: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``y = gain * Poisson(Ax) + offset + read_noise_std * eps``.

        Raises
        ------
        ValueError
            If ``Ax`` contains negative or non-finite values.
        """
        if not bool(torch.isfinite(Ax).all()) or bool((Ax < 0).any()):
            raise ValueError(
                "Ax must be a finite, non-negative expected photon count for Poisson sampling; "
                f"got values in [{Ax.min().item():g}, {Ax.max().item():g}]"
            )
        photons = torch.poisson(Ax, generator=generator)
        eps = torch.randn(Ax.shape, generator=generator, dtype=Ax.dtype, device=Ax.device)
        return self.gain * photons + self.offset + self.read_noise_std * eps

    def anscombe(self, y: Tensor) -> Tensor:
        """Apply the generalized Anscombe transform with this model's parameters.

        See :func:`anscombe`.
        """
        return anscombe(y, self.gain, self.offset, self.read_noise_std)

    def extra_repr(self) -> str:
        return f"gain={self.gain:g}, offset={self.offset:g}, read_noise_std={self.read_noise_std:g}"


class SignalDependentNoise(NoiseModel):
    """Gaussian noise whose variance grows linearly with the signal: ``Var y = slope * Ax + intercept``.

    The form of Poisson-Gaussian camera noise written in the measurement's own units: with gain
    ``g`` (ADU per photon), camera offset ``o`` and read noise ``r`` (ADU), ``slope = g`` and
    ``intercept = r^2 - g o``. The form survives any affine change of intensity units, so
    microscopy reconstructions, which rescale images, use it. It can also be fitted to an image
    without knowing the camera (see ``ppm_napari.noise.estimate_noise``).

    Parameters
    ----------
    slope : float
        Variance per unit of signal, non-negative.
    intercept : float
        Variance at zero signal; may be negative when the camera offset is positive.
    min_variance : float
        Floor of the variance, positive; it applies where ``slope * Ax + intercept`` falls below it.

    Notes
    -----
    :meth:`nll` is ``0.5 (y - Ax)^2 / v + 0.5 log v`` per entry, without ``0.5 log(2 pi)``.
    """

    def __init__(self, slope: float, intercept: float, min_variance: float):
        super().__init__()
        self.slope = _check_scalar("slope", slope, minimum=0.0)
        self.intercept = _check_scalar("intercept", intercept)
        self.min_variance = _check_scalar("min_variance", min_variance, minimum=0.0, inclusive=False)

    def variance(self, Ax: Tensor) -> Tensor:
        """Compute ``max(slope * Ax + intercept, min_variance)``."""
        return (self.slope * Ax + self.intercept).clamp(min=self.min_variance)

    def nll_entries(self, y: Tensor, Ax: Tensor) -> Tensor:
        variance = self.variance(Ax)
        return 0.5 * (y - Ax) ** 2 / variance + 0.5 * torch.log(variance)

    def sample(self, Ax: Tensor, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(Ax.shape, generator=generator, dtype=Ax.dtype, device=Ax.device)
        return Ax + self.variance(Ax).sqrt() * eps

    def rescaled(self, offset: float, scale: float) -> SignalDependentNoise:
        """Return the same noise for ``(y - offset) / scale``."""
        return SignalDependentNoise(
            self.slope / scale,
            (self.intercept + self.slope * offset) / scale**2,
            self.min_variance / scale**2,
        )

    def extra_repr(self) -> str:
        return f"slope={self.slope:g}, intercept={self.intercept:g}, min_variance={self.min_variance:g}"


def anscombe(y: Tensor, gain: float = 1.0, offset: float = 0.0, read_noise_std: float = 0.0) -> Tensor:
    """Stabilize the variance of Poisson-Gaussian data with the generalized Anscombe transform.

    For ``y = gain * Poisson(lam) + N(offset, read_noise_std^2)`` the result has approximately
    unit variance, and its distribution is close to Gaussian for ``lam`` above a few photons.

    Parameters
    ----------
    y : tensor
        Measurement in ADU, any shape.
    gain : float
        Camera gain in ADU per photon, positive.
    offset : float
        Mean of the Gaussian part in ADU.
    read_noise_std : float
        Standard deviation of the Gaussian part in ADU, non-negative.

    Returns
    -------
    tensor
        ``(2 / gain) * sqrt(max(gain * y + 3/8 gain^2 + read_noise_std^2 - gain * offset, 0))``,
        same shape as ``y``.

    Notes
    -----
    The transform of Murtagh, Starck and Bijaoui (1995), also given in Starck, Murtagh and
    Bijaoui, "Image Processing and Data Analysis" (1998). With ``gain = 1``, ``offset = 0`` and
    ``read_noise_std = 0`` it is the classical Anscombe transform ``2 sqrt(y + 3/8)``.
    """
    gain = _check_scalar("gain", gain, minimum=0.0, inclusive=False)
    offset = _check_scalar("offset", offset)
    read_noise_std = _check_scalar("read_noise_std", read_noise_std, minimum=0.0)

    argument = gain * y + 0.375 * gain**2 + read_noise_std**2 - gain * offset
    return (2.0 / gain) * torch.sqrt(argument.clamp(min=0))


def make_noise(noise_std: float | Tensor | None, noise: NoiseModel | None) -> NoiseModel | None:
    """Build an operator's noise model from its ``noise_std=`` or ``noise=`` argument.

    Returns ``GaussianNoise(noise_std)`` when ``noise_std`` is given, else ``noise`` (possibly
    ``None``). Raises ``ValueError`` when both are given.
    """
    if noise_std is not None and noise is not None:
        raise ValueError(
            "pass either noise_std= (for Gaussian noise) or noise= (any noise model), not both; "
            f"got noise_std={noise_std!r} and noise={noise!r}"
        )
    if noise_std is not None:
        return GaussianNoise(noise_std)
    if noise is not None and not isinstance(noise, NoiseModel):
        raise TypeError(f"noise must be a NoiseModel such as GaussianNoise; got {type(noise).__name__}")
    return noise


def _check_noise_std(noise_std: float | Tensor) -> Tensor:
    """Validate a Gaussian ``noise_std`` and return it as a floating-point tensor."""
    if isinstance(noise_std, Tensor):
        if not (noise_std.is_floating_point() or noise_std.dtype in _INTEGER_DTYPES):
            raise TypeError(f"noise_std must be a real tensor; got dtype {noise_std.dtype}")
        values = noise_std.detach()
        if not values.is_floating_point():
            values = values.to(torch.float64)
        if values.numel() == 0 or not bool(torch.isfinite(values).all()) or not bool((values > 0).all()):
            raise ValueError(f"noise_std must contain only positive finite values; got {noise_std}")
        return values.clone()

    # float64 keeps the given value exact; each use casts it to the dtype of the measurement.
    value = _check_scalar("noise_std", noise_std, minimum=0.0, inclusive=False)
    return torch.tensor(value, dtype=torch.float64)


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_scalar(name: str, value: float, minimum: float | None = None, inclusive: bool = True) -> float:
    """Validate a finite real number, optionally bounded below, and return it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, Tensor) and value.numel() == 1 and value.dtype != torch.bool:
            value = value.item()
        else:
            raise TypeError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    if minimum is not None:
        if inclusive and value < minimum:
            raise ValueError(f"{name} must be >= {minimum:g}; got {value:g}")
        if not inclusive and value <= minimum:
            raise ValueError(f"{name} must be > {minimum:g}; got {value:g}")
    return value
