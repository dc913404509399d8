"""docs/eht_prior.png: samples of the shipped black-hole ring prior next to its training images.

    .venv/bin/python scripts/ring_prior_figure.py docs/eht_prior.png
"""

from __future__ import annotations

import sys

import torch


def main(out: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ppm_core.io import atomic_path
    from ppm_core.priors import load_prior
    from ppm_core.sampling import edm_sampler
    from ppm_eht.reconstruct import DEFAULT_PRIOR
    from ppm_eht.rings import ring_images

    prior = load_prior(DEFAULT_PRIOR)
    samples = edm_sampler(prior, (16, 1, 64, 64), steps=32, generator=torch.Generator().manual_seed(0))[:, 0].numpy()
    training = ring_images(8, 64, torch.Generator().manual_seed(1))[:, 0].numpy() * 2 - 1  # into the prior's space
    fig, axes = plt.subplots(3, 8, figsize=(13, 5.3), constrained_layout=True)
    for ax, image in zip(axes.ravel(), [*samples, *training]):
        ax.imshow(image, cmap="afmhot", vmin=-1, vmax=1, extent=(80, -80, -80, 80))
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("prior samples (64x64, 2.5 uas pixels, 160 uas field)", loc="left", fontsize=10)
    axes[2, 0].set_title("training images: rings, crescents, m-rings, augmented model images", loc="left", fontsize=10)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "docs/eht_prior.png"))
