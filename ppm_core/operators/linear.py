"""Linear forward models: dense matrix, inpainting, blur and downsampling.

Every operator takes its noise model as ``noise_std=`` (additive Gaussian noise) or ``noise=``
(any :class:`~ppm_core.operators.noise.NoiseModel`). Tensors are registered as buffers, so
``.to(device)`` moves them, and each call casts them to the dtype of its input.
"""

from __future__ import annotations

import numbers

import numpy as np
import scipy.fft
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LinearOperator, _check_shape
from .noise import NoiseModel, make_noise

__all__ = ["MatrixOperator", "Inpainting", "Convolution", "Downsampling"]


class MatrixOperator(LinearOperator):
    """Dense matrix acting on vectors, ``A(x) = matrix @ x``.

    Parameters
    ----------
    matrix : (m, d) tensor or array
        Real, finite. Images are vectors shaped ``(batch, 1, 1, d)`` and measurements
        ``(batch, 1, 1, m)``.
    noise_std : float or tensor, optional
        Standard deviation of additive Gaussian noise on ``y``.
    noise : NoiseModel, optional
        Any noise model, in place of ``noise_std``.
    """

    matrix: Tensor

    def __init__(self, matrix: Tensor | np.ndarray, noise_std: float | Tensor | None = None, *,
                 noise: NoiseModel | None = None):
        matrix = _as_float_tensor("matrix", matrix)
        if matrix.ndim != 2:
            raise ValueError(f"matrix must be 2-D, shaped (m, d); got shape {tuple(matrix.shape)}")
        m, d = matrix.shape
        super().__init__((1, 1, d), (1, 1, m), make_noise(noise_std, noise))
        self.register_buffer("matrix", matrix.clone())

    def _A(self, x: Tensor) -> Tensor:
        return x @ self.matrix.to(dtype=x.dtype).T

    def _A_adjoint(self, y: Tensor) -> Tensor:
        return y @ self.matrix.to(dtype=y.dtype)


class Inpainting(LinearOperator):
    """Pixel mask, ``A(x) = mask * x``.

    The measurement has the shape of the image. Unobserved entries of ``A(x)`` are 0, and
    :meth:`nll` leaves them out of the sum, so the values of ``y`` there do not matter.

    Parameters
    ----------
    mask : (C, H, W) or (H, W) tensor or array
        1 (or ``True``) where a pixel is observed, 0 (or ``False``) where it is missing.
        A 2-D mask applies to every channel.
    in_shape : tuple (C, H, W), optional
        Shape of one image. Defaults to the mask's shape, with ``C = 1`` for a 2-D mask.
    noise_std : float or tensor, optional
        Standard deviation of additive Gaussian noise on ``y``.
    noise : NoiseModel, optional
        Any noise model, in place of ``noise_std``.
    """

    mask: Tensor

    def __init__(self, mask: Tensor | np.ndarray, in_shape: tuple[int, int, int] | None = None,
                 noise_std: float | Tensor | None = None, *, noise: NoiseModel | None = None):
        mask = _check_mask(mask)
        if in_shape is None:
            in_shape = (1, *mask.shape) if mask.ndim == 2 else tuple(mask.shape)
        in_shape = _check_shape("in_shape", in_shape)
        mask_fits = mask.shape[-2:] == in_shape[1:] and (mask.ndim == 2 or mask.shape[0] == in_shape[0])
        if not mask_fits:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit in_shape {in_shape}; "
                "pass a (C, H, W) or (H, W) mask of the image's size"
            )
        super().__init__(in_shape, in_shape, make_noise(noise_std, noise))
        self.register_buffer("mask", mask.reshape(-1, *in_shape[1:]).clone())

    def _A(self, x: Tensor) -> Tensor:
        return self.mask.to(dtype=x.dtype) * x

    def _A_adjoint(self, y: Tensor) -> Tensor:
        return self.mask.to(dtype=y.dtype) * y

    def nll(self, x: Tensor, y: Tensor) -> Tensor:
        """Compute ``-log p(y | A(x))`` over the observed entries only, a ``(batch,)`` tensor.

        ``y`` may be ``(1, *out_shape)``, shared by all images in ``x``.
        """
        noise = self._require_noise()
        self.check_measurement(y)
        return noise.nll(y, self.A(x), mask=self.mask)

    def simulate(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw a measurement ``y`` whose unobserved entries are set to 0."""
        y = super().simulate(x, generator=generator)
        return self.mask.to(dtype=y.dtype) * y


class Convolution(LinearOperator):
    """Blur by linear convolution with a point spread function, with zero padding outside the image.

    ``A(x)`` has the size of ``x``: it is the full linear convolution cropped so that a PSF equal
    to a delta at its centre ``(h // 2, w // 2)`` gives the identity. Nothing wraps around the
    borders. The adjoint is the correlation with the same PSF, cropped the same way.

    Parameters
    ----------
    psf : (h, w) or (C, h, w) tensor or array
        Point spread function, real and finite. A 2-D PSF blurs every channel; a 3-D one has one
        PSF per channel. It is used as given and not normalized, so pass a PSF that sums to 1 to
        preserve flux. It may be larger than the image.
    in_shape : tuple (C, H, W)
        Shape of one image. ``out_shape`` is the same.
    noise_std : float or tensor, optional
        Standard deviation of additive Gaussian noise on ``y``.
    noise : NoiseModel, optional
        Any noise model, in place of ``noise_std``.

    Notes
    -----
    For an odd PSF size the result equals ``scipy.signal.convolve2d(x, psf, mode="same")``.
    For an even size ``h``, scipy's "same" output starts at row ``(h - 1) // 2`` of the full
    convolution and this operator's at row ``h // 2``, so the two differ by a shift of one pixel.

    The convolution is computed with real FFTs over a zero-padded grid of at least
    ``(H + h - 1, W + w - 1)`` pixels, which is large enough that the circular convolution of
    the FFT equals the linear one on the cropped image.
    """

    psf: Tensor
    psf_fft: Tensor

    def __init__(self, psf: Tensor | np.ndarray, in_shape: tuple[int, int, int],
                 noise_std: float | Tensor | None = None, *, noise: NoiseModel | None = None):
        psf = _as_float_tensor("psf", psf)
        in_shape = _check_shape("in_shape", in_shape)
        if psf.ndim == 2:
            psf = psf[None]
        if psf.ndim != 3 or psf.shape[0] not in (1, in_shape[0]):
            raise ValueError(
                f"psf must be shaped (h, w) or (C, h, w) with C equal to 1 or to the {in_shape[0]} "
                f"channels of in_shape {in_shape}; got shape {tuple(psf.shape)}"
            )
        super().__init__(in_shape, in_shape, make_noise(noise_std, noise))
        self.register_buffer("psf", psf.clone())

        # Grid size for which circular convolution equals linear convolution on the image.
        h, w = psf.shape[-2:]
        _, height, width = in_shape
        self.fft_shape = (
            scipy.fft.next_fast_len(height + h - 1, real=True),
            scipy.fft.next_fast_len(width + w - 1, real=True),
        )

        # Roll the PSF centre to index (0, 0) so that the cropped output starts at index 0.
        kernel = psf.new_zeros((psf.shape[0], *self.fft_shape))
        kernel[:, :h, :w] = psf
        kernel = torch.roll(kernel, shifts=(-(h // 2), -(w // 2)), dims=(-2, -1))

        # Computed in float64, then stored in the PSF's dtype as real pairs, because
        # Module.to(dtype) would discard the imaginary part of a complex buffer.
        kernel_fft = torch.view_as_real(torch.fft.rfft2(kernel.to(torch.float64)))
        self.register_buffer("psf_fft", kernel_fft.to(dtype=psf.dtype).contiguous())

    def _kernel_fft(self, dtype: torch.dtype) -> Tensor:
        return torch.view_as_complex(self.psf_fft.to(dtype=dtype).contiguous())

    def _A(self, x: Tensor) -> Tensor:
        return self._filter(x, self._kernel_fft(x.dtype))

    def _A_adjoint(self, y: Tensor) -> Tensor:
        # Correlation: the transpose of a circular convolution multiplies by the conjugate spectrum.
        return self._filter(y, self._kernel_fft(y.dtype).conj())

    def _filter(self, image: Tensor, spectrum: Tensor) -> Tensor:
        """Multiply the spectrum of the zero-padded ``image`` by ``spectrum`` and crop back."""
        height, width = image.shape[-2:]
        padded_fft = torch.fft.rfft2(image, s=self.fft_shape)
        filtered = torch.fft.irfft2(padded_fft * spectrum, s=self.fft_shape)
        return filtered[..., :height, :width]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, psf_shape={tuple(self.psf.shape)}"


class Downsampling(LinearOperator):
    """Area downsampling: the mean over each ``factor x factor`` block of pixels.

    Parameters
    ----------
    factor : int
        Downsampling factor, at least 1.
    in_shape : tuple (C, H, W)
        Shape of one image. ``H`` and ``W`` must be divisible by ``factor``. To downsample other
        sizes, crop or pad the image first (for example by composing with another operator).
        ``out_shape`` is ``(C, H // factor, W // factor)``.
    noise_std : float or tensor, optional
        Standard deviation of additive Gaussian noise on ``y``.
    noise : NoiseModel, optional
        Any noise model, in place of ``noise_std``.

    Notes
    -----
    The adjoint is nearest-neighbour upsampling divided by ``factor^2``.
    """

    def __init__(self, factor: int, in_shape: tuple[int, int, int],
                 noise_std: float | Tensor | None = None, *, noise: NoiseModel | None = None):
        if isinstance(factor, bool) or not isinstance(factor, numbers.Integral) or factor < 1:
            raise ValueError(f"factor must be a positive int; got {factor!r}")
        factor = int(factor)
        channels, height, width = _check_shape("in_shape", in_shape)
        if height % factor or width % factor:
            raise ValueError(
                f"in_shape {in_shape} must have H and W divisible by factor={factor}; "
                "crop or pad the image to a multiple of the factor first"
            )
        out_shape = (channels, height // factor, width // factor)
        super().__init__((channels, height, width), out_shape, make_noise(noise_std, noise))
        self.factor = factor

    def _A(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.factor)

    def _A_adjoint(self, y: Tensor) -> Tensor:
        upsampled = y.repeat_interleave(self.factor, dim=-2).repeat_interleave(self.factor, dim=-1)
        return upsampled / self.factor**2

    def extra_repr(self) -> str:
        return f"factor={self.factor}, {super().extra_repr()}"


def _as_float_tensor(name: str, value: Tensor | np.ndarray) -> Tensor:
    """Convert ``value`` to a finite real floating-point tensor, or raise naming ``name``."""
    if not isinstance(value, (Tensor, np.ndarray)):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array; got {type(value).__name__}")
    tensor = torch.as_tensor(value).detach()
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a real floating-point dtype; got {tensor.dtype}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


def _check_mask(mask: Tensor | np.ndarray) -> Tensor:
    """Validate an inpainting mask of zeros and ones and return it as a bool tensor."""
    if not isinstance(mask, (Tensor, np.ndarray)):
        raise TypeError(f"mask must be a torch.Tensor or numpy array; got {type(mask).__name__}")
    mask = torch.as_tensor(mask).detach()
    if mask.ndim not in (2, 3):
        raise ValueError(f"mask must be shaped (H, W) or (C, H, W); got shape {tuple(mask.shape)}")
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must contain only 0 and 1 (or False and True)")
    return mask.to(torch.bool)
