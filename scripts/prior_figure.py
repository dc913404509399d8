"""docs/filament_prior.png: samples of the shipped filament prior next to crops of the real SIM image.

    .venv/bin/python scripts/prior_figure.py docs/filament_prior.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main(out: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tifffile

    from ppm_core.io import atomic_path
    from ppm_core.priors import load_prior
    from ppm_core.sampling import edm_sampler
    from ppm_napari.cli import DEFAULT_PRIOR

    prior = load_prior(DEFAULT_PRIOR)
    samples = edm_sampler(prior, (6, 1, 128, 128), steps=32, generator=torch.Generator().manual_seed(0))[:, 0].numpy()
    truth = np.squeeze(tifffile.imread(ROOT / "sample_data" / "biosr_mt" / "MT_Cell001_crop007_SIM_GT.tif")).astype(float)
    crops = [truth[r : r + 128, c : c + 128] for r, c in ((0, 0), (0, 128), (128, 0), (128, 128), (64, 64), (32, 96))]
    fig, axes = plt.subplots(2, 6, figsize=(15, 5.4), constrained_layout=True)
    for ax, image in zip(axes[0], samples):
        ax.imshow(image, cmap="gray", vmin=-1, vmax=1)  # the prior's space: 0.1/99.9 percentiles at -1/1
        ax.set_axis_off()
    for ax, image in zip(axes[1], crops):
        low, high = np.percentile(image, [0.1, 99.9])
        ax.imshow(image, cmap="gray", vmin=low, vmax=high)
        ax.set_axis_off()
    axes[0, 0].set_title("prior samples (synthetic training, 128x128, 31.3 nm pixels)", loc="left", fontsize=10)
    axes[1, 0].set_title("BioSR SIM ground truth, 128x128 crops (never used in training)", loc="left", fontsize=10)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/filament_prior.png"))
