"""Forward-model contract: :class:`Operator`, :class:`LinearOperator`, :class:`ComposedOperator`.

An operator maps a batch of images ``x``, shaped ``(batch, *in_shape)``, to noiseless measurements
``A(x)``, shaped ``(batch, *out_shape)``, and owns the noise model that turns ``A(x)`` into a
measurement ``y``. A vector problem of dimension ``d`` uses ``in_shape = (1, 1, d)``.

Subclasses implement ``_A`` (and ``_A_adjoint`` for linear operators). The public methods ``A`` and
``A_adjoint`` validate their input first and then call them.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from .noise import NoiseModel, make_noise

__all__ = ["Operator", "LinearOperator", "ComposedOperator"]


class Operator(torch.nn.Module, ABC):
    """Forward model ``y ~ p(y | A(x))`` with a shape contract and a noise model.

    Parameters
    ----------
    in_shape : tuple of 3 ints
        ``(C, H, W)`` of one image ``x``.
    out_shape : tuple of 3 ints
        ``(C', H', W')`` of one measurement ``y``.
    noise : NoiseModel, optional
        Noise model of ``y`` given ``A(x)``. Without one, :meth:`nll` and :meth:`simulate` raise
        ``ValueError``, but ``A`` still works (for example inside a :class:`ComposedOperator`).
    """

    def __init__(self, in_shape: tuple[int, int, int], out_shape: tuple[int, int, int],
                 noise: NoiseModel | None = None):
        super().__init__()
        self.in_shape = _check_shape("in_shape", in_shape)
        self.out_shape = _check_shape("out_shape", out_shape)
        self.noise = make_noise(None, noise)

    @abstractmethod
    def _A(self, x: Tensor) -> Tensor:
        """Apply the forward model to an already validated ``x``."""

    def A(self, x: Tensor) -> Tensor:
        """Apply the noiseless forward model.

        Parameters
        ----------
        x : (batch, *in_shape) tensor
            Images, floating point and finite.

        Returns
        -------
        (batch, *out_shape) tensor
        """
        self.check_input(x)
        return self._A(x)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the noiseless forward model, the same as :meth:`A`."""
        return self.A(x)

    def nll(self, x: Tensor, y: Tensor) -> Tensor:
        """Compute the negative log-likelihood ``-log p(y | A(x))`` of each image.

        Parameters
        ----------
        x : (batch, *in_shape) tensor
            Images.
        y : (batch, *out_shape) or (1, *out_shape) tensor
            Measurement. A batch of 1 is shared by all images in ``x``.

        Returns
        -------
        (batch,) tensor
            Summed over the entries of the measurement, up to the constant that the noise model
            documents. Differentiable in ``x``.
        """
        noise = self._require_noise()
        self.check_measurement(y)
        return noise.nll(y, self.A(x))

    def simulate(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw a measurement ``y = noise.sample(A(x))``, a ``(batch, *out_shape)`` tensor."""
        noise = self._require_noise()
        return noise.sample(self.A(x), generator=generator)

    def check_input(self, x: Tensor) -> None:
        """Raise ``TypeError`` or ``ValueError`` unless ``x`` is a finite ``(batch, *in_shape)`` float tensor."""
        _check_tensor("x", x, self.in_shape, "in_shape")

    def check_measurement(self, y: Tensor) -> None:
        """Raise ``TypeError`` or ``ValueError`` unless ``y`` is a finite ``(batch, *out_shape)`` float tensor."""
        _check_tensor("y", y, self.out_shape, "out_shape")

    def _require_noise(self) -> NoiseModel:
        if self.noise is None:
            raise ValueError(
                f"{type(self).__name__} has no noise model; pass noise_std= or noise= when creating it"
            )
        return self.noise

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, out_shape={self.out_shape}"


class LinearOperator(Operator):
    """Linear forward model with an adjoint ``A_adjoint``.

    Subclasses implement ``_A`` and ``_A_adjoint`` such that ``<A x, y> = <x, A_adjoint y>``.
    """

    @abstractmethod
    def _A_adjoint(self, y: Tensor) -> Tensor:
        """Apply the adjoint to an already validated ``y``."""

    def A_adjoint(self, y: Tensor) -> Tensor:
        """Apply the adjoint of the forward model.

        Parameters
        ----------
        y : (batch, *out_shape) tensor
            Measurements, floating point and finite.

        Returns
        -------
        (batch, *in_shape) tensor
        """
        self.check_measurement(y)
        return self._A_adjoint(y)

    def normal(self, x: Tensor) -> Tensor:
        """Apply the normal operator ``A_adjoint(A(x))``, a ``(batch, *in_shape)`` tensor."""
        return self.A_adjoint(self.A(x))


class ComposedOperator(LinearOperator):
    """Chain of linear operators, applied in the order given.

    ``ComposedOperator(Convolution(psf, shape), Downsampling(2, shape))`` blurs, then downsamples.
    The adjoint applies the adjoints in reverse order.

    Parameters
    ----------
    *operators : LinearOperator
        At least one. The ``out_shape`` of each must equal the ``in_shape`` of the next.
    noise_std : float or tensor, optional
        Standard deviation of additive Gaussian noise on the final measurement.
    noise : NoiseModel, optional
        Noise model of the final measurement. Give at most one of ``noise_std`` and ``noise``.
        When neither is given, the last operator's noise model is used. The noise models of
        the other operators are ignored.
    """

    def __init__(self, *operators: LinearOperator, noise_std: float | Tensor | None = None,
                 noise: NoiseModel | None = None):
        _check_chain(operators)
        noise = make_noise(noise_std, noise)
        if noise is None:
            noise = operators[-1].noise
        super().__init__(operators[0].in_shape, operators[-1].out_shape, noise)
        self.operators = torch.nn.ModuleList(operators)

    def _A(self, x: Tensor) -> Tensor:
        for operator in self.operators:
            x = operator.A(x)
        return x

    def _A_adjoint(self, y: Tensor) -> Tensor:
        for operator in reversed(self.operators):
            y = operator.A_adjoint(y)
        return y


def _check_chain(operators: tuple[LinearOperator, ...]) -> None:
    """Raise unless ``operators`` is a non-empty chain of linear operators with matching shapes."""
    if len(operators) == 0:
        raise ValueError("ComposedOperator needs at least one operator; got none")
    for i, operator in enumerate(operators):
        if not isinstance(operator, LinearOperator):
            raise TypeError(
                f"operators[{i}] must be a LinearOperator; got {type(operator).__name__}"
            )
    for i in range(1, len(operators)):
        previous, current = operators[i - 1], operators[i]
        if previous.out_shape != current.in_shape:
            raise ValueError(
                f"operators[{i}] ({type(current).__name__}) has in_shape {current.in_shape}, which "
                f"does not match the out_shape {previous.out_shape} of operators[{i - 1}] "
                f"({type(previous).__name__})"
            )


def _check_shape(name: str, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Validate a ``(C, H, W)`` shape of positive ints and return it as a tuple."""
    try:
        values = tuple(shape)
    except TypeError:
        raise TypeError(f"{name} must be a tuple (C, H, W) of 3 positive ints; got {shape!r}") from None
    valid = len(values) == 3 and all(
        isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > 0 for n in values
    )
    if not valid:
        raise ValueError(f"{name} must be a tuple (C, H, W) of 3 positive ints; got {shape!r}")
    return tuple(int(n) for n in values)


def _check_tensor(name: str, tensor: Tensor, shape: tuple[int, int, int], shape_name: str) -> None:
    """Raise unless ``tensor`` is a finite floating-point ``(batch, *shape)`` tensor."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
    if tensor.ndim != 4 or tuple(tensor.shape[1:]) != shape:
        expected = "(batch, " + ", ".join(str(n) for n in shape) + ")"
        raise ValueError(
            f"{name} must have shape {expected} to match the operator's {shape_name}; "
            f"got {tuple(tensor.shape)}"
        )
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype; got {tensor.dtype}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
