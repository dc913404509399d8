"""Differentiable VLBI forward models in torch, on the products collected by ``ppm_eht.data``.

``x`` is an image in Jy per pixel, shaped ``(batch, 1, npix, npix)`` in ehtim's pixel order
(``imvec`` reshaped row by row). Visibilities are ``V = F x`` with ehtim's DFT matrix ``F``;
closure phases and log closure amplitudes are formed from them by index.

The chi-squares equal ehtim's ``Obsdata.chisq`` definitions (reduced, with the same
normalizations), which the tests check on real data:

- vis: ``sum |V - V_obs|^2 / sigma^2 / (2 N)``
- amp: ``sum (|V| - A_obs)^2 / sigma^2 / N``
- cphase: ``(2 / N) sum (1 - cos(phi_obs - phi)) / sigma^2`` (radians)
- logcamp: ``sum (L_obs - L)^2 / sigma^2 / N``

The negative log-likelihood of :class:`ClosureOperator` is the unreduced Gaussian (von Mises
for phases) form of the same terms, ``N chi2 / 2`` each for closure phases and log closure
amplitudes, plus a total-flux term ``(sum x - F)^2 / (2 (f F)^2)``. Station gains are not
calibrated in real data, so the default likelihood uses only these gain-free closure products.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ppm_core.operators import Operator

from .data import ClosureData

TERMS = ("cphase", "logcamp", "flux", "vis", "amp")


def _as_tensor(values, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.as_tensor(np.asarray(values), dtype=dtype)


class ClosureOperator(Operator):
    """Closure phases and log closure amplitudes of an image, with their likelihood.

    Parameters
    ----------
    data : ClosureData
        Data products and DFT matrix of one observation on the image grid.
    terms : tuple of str
        Likelihood terms, any of ``"cphase"``, ``"logcamp"``, ``"flux"`` (closure-only plus flux by
        default), ``"vis"`` and ``"amp"`` (only for gain-calibrated data).
    flux_fraction : float
        Standard deviation of the total-flux term as a fraction of ``data.total_flux``.
    """

    def __init__(self, data: ClosureData, terms: tuple[str, ...] = ("cphase", "logcamp", "flux"), flux_fraction: float = 0.1):
        unknown = set(terms) - set(TERMS)
        if unknown:
            raise ValueError(f"terms must be among {TERMS}; got {sorted(unknown)}")
        if "flux" in terms and not math.isfinite(data.total_flux):
            raise ValueError("the flux term needs data.total_flux; pass total_flux or drop 'flux' from terms")
        if not flux_fraction > 0:
            raise ValueError(f"flux_fraction must be positive; got {flux_fraction}")
        n_out = len(data.cphase) + len(data.logcamp)
        super().__init__((1, data.npix, data.npix), (1, 1, max(n_out, 1)))
        self.data = data
        self.terms = tuple(terms)
        self.flux_fraction = float(flux_fraction)
        dft = torch.from_numpy(np.ascontiguousarray(data.dft))
        self.register_buffer("dft_real", dft.real.clone())
        self.register_buffer("dft_imag", dft.imag.clone())
        self.register_buffer("cphase_index", _as_tensor(data.cphase_index, torch.long))
        self.register_buffer("logcamp_index", _as_tensor(data.logcamp_index, torch.long))
        self.register_buffer("vis_index", _as_tensor(data.vis_index, torch.long))
        self.register_buffer("cphase_obs", _as_tensor(np.deg2rad(data.cphase)))
        self.register_buffer("cphase_sigma", _as_tensor(np.deg2rad(data.cphase_sigma)))
        self.register_buffer("logcamp_obs", _as_tensor(data.logcamp))
        self.register_buffer("logcamp_sigma", _as_tensor(data.logcamp_sigma))
        self.register_buffer("vis_obs_real", _as_tensor(np.real(data.vis)))
        self.register_buffer("vis_obs_imag", _as_tensor(np.imag(data.vis)))
        self.register_buffer("vis_sigma", _as_tensor(data.vis_sigma))
        self.register_buffer("amp_obs", _as_tensor(data.amp))
        self.register_buffer("amp_sigma", _as_tensor(data.amp_sigma))

    # -------------------------------------------------------------------------------------------
    # Products

    def visibilities(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Real and imaginary parts of ``F x`` at the distinct (u, v) points, each ``(batch, K)``."""
        flat = x.reshape(x.shape[0], -1)
        return flat @ self.dft_real.to(x.dtype).T, flat @ self.dft_imag.to(x.dtype).T

    def closure_phases(self, x: Tensor) -> Tensor:
        """Closure phases in radians, ``(batch, N_cp)``."""
        re, im = self.visibilities(x)
        phase = torch.atan2(im, re)
        idx = self.cphase_index
        return phase[:, idx[:, 0]] + phase[:, idx[:, 1]] + phase[:, idx[:, 2]]

    def log_closure_amplitudes(self, x: Tensor) -> Tensor:
        """Log closure amplitudes ``log|V1| + log|V2| - log|V3| - log|V4|``, ``(batch, N_camp)``."""
        re, im = self.visibilities(x)
        log_amp = 0.5 * torch.log(re**2 + im**2 + torch.finfo(x.dtype).tiny)
        idx = self.logcamp_index
        return log_amp[:, idx[:, 0]] + log_amp[:, idx[:, 1]] - log_amp[:, idx[:, 2]] - log_amp[:, idx[:, 3]]

    def _A(self, x: Tensor) -> Tensor:
        products = torch.cat([self.closure_phases(x), self.log_closure_amplitudes(x)], dim=1)
        return products.reshape(x.shape[0], *self.out_shape)

    def measurement(self) -> Tensor:
        """Return the observed closure phases (radians) and log closure amplitudes, shaped like ``A(x)``."""
        return torch.cat([self.cphase_obs, self.logcamp_obs]).reshape(1, *self.out_shape)

    # -------------------------------------------------------------------------------------------
    # Chi-squares (ehtim's reduced definitions) and the likelihood

    def observed_closures(self, y: Tensor | None, x: Tensor) -> tuple[Tensor, Tensor]:
        """Closure phases and log closure amplitudes to compare ``x`` with: the data's own, or those in ``y``.

        ``y`` is shaped like :meth:`measurement`, with a batch of one or of ``x``'s length. It lets
        one (u, v) coverage and its uncertainties serve many measurements (amortized training).
        """
        if y is None:
            return self.cphase_obs.to(x.dtype)[None], self.logcamp_obs.to(x.dtype)[None]
        flat = y.reshape(y.shape[0], -1).to(x.dtype)
        n_cp = len(self.cphase_obs)
        if flat.shape[1] != n_cp + len(self.logcamp_obs) or flat.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"y must have shape (1 or {x.shape[0]}, {', '.join(map(str, self.out_shape))}); got {tuple(y.shape)}")
        return flat[:, :n_cp], flat[:, n_cp:]

    def chisq(self, x: Tensor, dtype: str, y: Tensor | None = None) -> Tensor:
        """Reduced chi-square of each image for ``dtype`` in ``vis, amp, cphase, logcamp``, ``(batch,)``.

        ``y`` (closure products shaped like :meth:`measurement`) replaces the observed closures.
        """
        if dtype == "cphase":
            diff = self.observed_closures(y, x)[0] - self.closure_phases(x)
            return (2.0 / diff.shape[1]) * ((1 - torch.cos(diff)) / self.cphase_sigma.to(x.dtype) ** 2).sum(1)
        if dtype == "logcamp":
            diff = self.observed_closures(y, x)[1] - self.log_closure_amplitudes(x)
            return ((diff / self.logcamp_sigma.to(x.dtype)) ** 2).sum(1) / diff.shape[1]
        re, im = self.visibilities(x)
        re, im = re[:, self.vis_index], im[:, self.vis_index]
        if dtype == "vis":
            err = (re - self.vis_obs_real.to(x.dtype)) ** 2 + (im - self.vis_obs_imag.to(x.dtype)) ** 2
            return (err / self.vis_sigma.to(x.dtype) ** 2).sum(1) / (2 * err.shape[1])
        if dtype == "amp":
            amp = torch.sqrt(re**2 + im**2)
            return (((amp - self.amp_obs.to(x.dtype)) / self.amp_sigma.to(x.dtype)) ** 2).sum(1) / amp.shape[1]
        raise ValueError(f"dtype must be one of vis, amp, cphase, logcamp; got {dtype!r}")

    def nll(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Negative log-likelihood of each image, ``(batch,)``.

        Without ``y`` the closure products are the operator's own data; a ``y`` shaped like
        :meth:`measurement` (batch of one or of ``x``'s length) replaces them, with the data's
        uncertainties. The flux, visibility and amplitude terms always use the operator's data.
        """
        self.check_input(x)
        total = x.new_zeros(x.shape[0])
        if "cphase" in self.terms and len(self.data.cphase):
            total = total + 0.5 * len(self.data.cphase) * self.chisq(x, "cphase", y)
        if "logcamp" in self.terms and len(self.data.logcamp):
            total = total + 0.5 * len(self.data.logcamp) * self.chisq(x, "logcamp", y)
        if "vis" in self.terms:
            total = total + len(self.data.vis) * self.chisq(x, "vis")
        if "amp" in self.terms:
            total = total + 0.5 * len(self.data.amp) * self.chisq(x, "amp")
        if "flux" in self.terms:
            flux = x.reshape(x.shape[0], -1).sum(1)
            sigma = self.flux_fraction * self.data.total_flux
            total = total + 0.5 * ((flux - self.data.total_flux) / sigma) ** 2
        return total
