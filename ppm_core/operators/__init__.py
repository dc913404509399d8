"""Forward models ``y ~ p(y | A(x))``: operators with their shapes, adjoints and noise models."""

from __future__ import annotations

from .base import ComposedOperator, LinearOperator, Operator
from .linear import Convolution, Downsampling, Inpainting, MatrixOperator
from .noise import GaussianNoise, NoiseModel, PoissonGaussianNoise, SignalDependentNoise, anscombe

__all__ = [
    "Operator",
    "LinearOperator",
    "ComposedOperator",
    "MatrixOperator",
    "Inpainting",
    "Convolution",
    "Downsampling",
    "NoiseModel",
    "GaussianNoise",
    "PoissonGaussianNoise",
    "SignalDependentNoise",
    "anscombe",
]
