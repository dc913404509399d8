"""Widefield image formation on a super-resolved grid: ``y = S(PSF * x) + n``.

``x`` is the fluorophore density on the fine grid (pixel = camera pixel / scale), ``PSF * x`` the
optical blur, ``S`` the camera's integration over ``scale x scale`` fine pixels (area mean), and
``n`` Gaussian or signal-dependent (Poisson-Gaussian) noise.

Borders: the image is reflected outwards by the PSF's half-width before the blur, so light
from just outside the field of view is modelled as a mirror of the light inside. This keeps
constant images constant (``A(c) = c``), which zero padding would not, and nothing wraps round
as it would with a periodic FFT.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ppm_core.operators import LinearOperator, NoiseModel
from ppm_core.operators.noise import make_noise


class SuperResolution(LinearOperator):
    """Blur by a PSF, then integrate over ``scale x scale`` pixel blocks.

    Parameters
    ----------
    psf : (h, w) array
        PSF on the fine grid, odd sides, summing to 1 (checked to within 1%).
    scale : int
        Ratio of camera pixel to fine pixel, at least 1.
    measurement_shape : (H, W)
        Shape of the measured image; the fine image is ``(1, scale H, scale W)``. Any sizes, odd
        ones included.
    noise_std, noise : as for every operator.
    """

    def __init__(self, psf: np.ndarray | Tensor, scale: int, measurement_shape: tuple[int, int],
                 noise_std: float | None = None, *, noise: NoiseModel | None = None):
        if isinstance(scale, bool) or not isinstance(scale, numbers.Integral) or scale < 1:
            raise ValueError(f"scale must be a positive integer; got {scale!r}")
        if len(measurement_shape) != 2 or any(not isinstance(n, numbers.Integral) or n < 1 for n in measurement_shape):
            raise ValueError(f"measurement_shape must be (H, W) with positive integers; got {measurement_shape!r}")
        psf = torch.as_tensor(np.asarray(psf, dtype=np.float64) if not isinstance(psf, Tensor) else psf, dtype=torch.float64)
        if psf.ndim != 2 or psf.shape[0] % 2 == 0 or psf.shape[1] % 2 == 0:
            raise ValueError(f"psf must be a 2-D array with odd sides; got shape {tuple(psf.shape)}")
        if not bool(torch.isfinite(psf).all()) or bool((psf < 0).any()):
            raise ValueError("psf must be finite and non-negative")
        if abs(float(psf.sum()) - 1) > 0.01:
            raise ValueError(f"psf must sum to 1 (it is normalized by the PSF functions); got sum {float(psf.sum()):.4g}")
        height, width = (int(n) for n in measurement_shape)
        scale = int(scale)
        super().__init__((1, scale * height, scale * width), (1, height, width), make_noise(noise_std, noise))
        self.scale = scale
        self.register_buffer("psf", psf)  # float64; cast to the input dtype at use
        self.pad = (psf.shape[0] // 2, psf.shape[1] // 2)

    def _blur(self, x: Tensor) -> Tensor:
        ph, pw = self.pad
        height, width = x.shape[-2:]
        # Reflection needs the pad narrower than the image; larger PSFs fall back to edge replication.
        mode = "reflect" if ph < height and pw < width else "replicate"
        padded = F.pad(x, (pw, pw, ph, ph), mode=mode)
        size = (padded.shape[-2] + 2 * ph, padded.shape[-1] + 2 * pw)
        spectrum = torch.fft.rfft2(padded, s=size) * torch.fft.rfft2(self.psf.to(x.dtype)[None, None], s=size)
        full = torch.fft.irfft2(spectrum, s=size)
        # "valid" part of the linear convolution of the padded image = the original grid.
        return full[..., 2 * ph : 2 * ph + height, 2 * pw : 2 * pw + width]

    def _A(self, x: Tensor) -> Tensor:
        blurred = self._blur(x)
        return F.avg_pool2d(blurred, self.scale) if self.scale > 1 else blurred

    def _A_adjoint(self, y: Tensor) -> Tensor:
        # The forward map is linear, so its vector-Jacobian product at any point is the adjoint.
        with torch.enable_grad():
            probe = torch.zeros((y.shape[0], *self.in_shape), dtype=y.dtype, device=y.device, requires_grad=True)
            (adjoint,) = torch.autograd.grad(self._A(probe), probe, y, create_graph=y.requires_grad)
        return adjoint

    def extra_repr(self) -> str:
        return f"scale={self.scale}, psf_shape={tuple(self.psf.shape)}, {super().extra_repr()}"
