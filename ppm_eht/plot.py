"""The summary figure of a VLBI posterior: samples, mean, std, blurred mean, uv coverage, residuals."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ppm_core.io import atomic_path

from .data import UAS, quiet
from .operators import ClosureOperator


def closure_phase_residuals(posterior, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalized closure-phase residuals ``wrap(phi_obs - phi) / sigma`` of one image, with the data's times order."""
    operator = ClosureOperator(posterior.data, terms=("cphase",))
    with torch.no_grad():
        model = operator.closure_phases(torch.as_tensor(np.asarray(image, dtype=np.float64))[None, None])[0].numpy()
    observed = np.deg2rad(posterior.data.cphase)
    residual = np.angle(np.exp(1j * (observed - model)))
    return residual / np.deg2rad(posterior.data.cphase_sigma), np.arange(len(residual))


def summary_figure(posterior, path: str | os.PathLike, n_samples: int = 4, title: str | None = None) -> Path:
    """Write the summary PNG of a :class:`~ppm_eht.reconstruct.VLBIPosterior`, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fov = posterior.psize_uas * posterior.samples.shape[-1]
    extent = (fov / 2, -fov / 2, -fov / 2, fov / 2)  # east to the left, as on the sky
    to_tb = 1.0 / (posterior.psize_uas**2)  # Jy per square microarcsecond
    first = posterior.samples[:n_samples]
    vmax = float(np.percentile(posterior.samples, 99.9)) * to_tb
    beam = quiet(posterior.obs.res)
    blurred = posterior.mean_image.blur_circ(beam).imvec.reshape(posterior.mean.shape)

    columns = max(len(first), 3) + 1
    fig, axes = plt.subplots(2, columns, figsize=(2.6 * columns, 5.6), constrained_layout=True)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for i, sample in enumerate(first):
        axes[0, i].imshow(sample * to_tb, cmap="afmhot", vmin=0, vmax=vmax, extent=extent)
        ring = posterior.features[i]
        label = f"sample {i + 1}"
        if ring is not None:
            label += f"\nd = {ring.diameter:.1f} uas"
        axes[0, i].set_title(label, fontsize=9)
    for ax in axes[0, len(first):-1]:
        ax.axis("off")
    im = axes[0, -1].imshow(posterior.mean * to_tb, cmap="afmhot", vmin=0, vmax=vmax, extent=extent)
    axes[0, -1].set_title("posterior mean", fontsize=9)
    fig.colorbar(im, ax=axes[0, -1], fraction=0.046, label="Jy / uas$^2$")
    im = axes[1, 0].imshow(posterior.std * to_tb, cmap="inferno", vmin=0, extent=extent)
    axes[1, 0].set_title("posterior std", fontsize=9)
    fig.colorbar(im, ax=axes[1, 0], fraction=0.046)
    axes[1, 1].imshow(blurred * to_tb, cmap="afmhot", vmin=0, extent=extent)
    axes[1, 1].set_title(f"mean blurred to {beam / UAS:.0f} uas", fontsize=9)

    ax = axes[1, 2]
    uv = posterior.obs.unpack(["u", "v"])
    ax.plot(uv["u"] / 1e9, uv["v"] / 1e9, ".", ms=2, color="tab:blue")
    ax.plot(-uv["u"] / 1e9, -uv["v"] / 1e9, ".", ms=2, color="tab:blue")
    limit = 1.05 * np.max(np.hypot(uv["u"], uv["v"])) / 1e9
    ax.set_xlim(limit, -limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.set_xticks([-8, 0, 8])
    ax.set_yticks([-8, 0, 8])
    ax.set_xlabel("u (G$\\lambda$)", fontsize=8)
    ax.set_ylabel("v (G$\\lambda$)", fontsize=8)
    ax.set_title("uv coverage", fontsize=9)

    if columns > 3 and "cphase" in posterior.chisq:
        ax = axes[1, 3]
        # The residuals behind the chi-squares: those of the samples before the centring shift.
        uncentred = posterior.uncentred if posterior.uncentred is not None else posterior.samples
        for i, sample in enumerate(uncentred):
            residual, order = closure_phase_residuals(posterior, sample)
            ax.plot(order, residual, ".", ms=2, alpha=0.4, color="tab:gray" if i else "tab:red")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("closure triangle index", fontsize=8)
        ax.set_ylabel("residual / sigma", fontsize=8)
        ax.set_yticks([-3, 0, 3])
        ax.set_ylim(-5, 5)
        chi2 = np.median(posterior.chisq["cphase"])
        ax.set_title(f"closure-phase residuals\nmedian $\\chi^2_{{cp}}$ = {chi2:.2f}", fontsize=9)
    for ax in axes[1, 4:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
