"""``make demo``: train a small prior on synthetic spots, sample it, and reconstruct an inpainting problem.

Writes into ``--out``: the prior (``prior/``), a grid of prior samples (``prior_samples.png``)
and a figure of the posterior (``inpainting_posterior.png``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from .figures import image_grid
from .inference import reconstruct
from .io import atomic_path, save_png
from .operators import Inpainting
from .priors import UNetConfig, load_prior
from .sampling import edm_sampler
from .training import SyntheticSource, TrainConfig, train_prior

logger = logging.getLogger("ppm.demo")


def _progress(total: int, desc: str):
    bar = tqdm(total=total, desc=desc)

    def callback(state: dict) -> None:
        bar.n = state.get("step", state.get("iteration", state.get("i", 0) + 1))
        bar.refresh()

    return bar, callback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--ppm-steps", type=int, default=400)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    # 1. Train a small prior on 32x32 crops of synthetic spots (same code as `ppm train-prior`).
    prior_dir = args.out / "prior"
    bar, callback = _progress(args.train_steps, "train prior")
    with bar:
        train_prior(
            SyntheticSource("blobs"),
            prior_dir,
            UNetConfig(base_channels=16, channel_mults=[1, 2, 2], blocks_per_level=1, embedding_dim=64),
            TrainConfig(steps=args.train_steps, batch_size=16, crop_size=32, lr=1e-3, warmup_steps=100, ema_halflife=100, checkpoint_every=500),
            callback=callback,
        )
    prior = load_prior(prior_dir)

    # 2. Unconditional samples, to inspect the prior.
    samples = edm_sampler(prior, (16, 1, 32, 32), steps=24, generator=torch.Generator().manual_seed(0))
    save_png(args.out / "prior_samples.png", image_grid(samples, prior.normalization))

    # 3. Inpainting: hide a 12x12 square of a fresh synthetic image and draw posterior samples.
    truth = SyntheticSource("blobs").sample(1, 32, torch.Generator().manual_seed(7))
    mask = torch.ones(1, 32, 32)
    mask[:, 10:22, 10:22] = 0
    operator = Inpainting(mask, noise_std=0.05)
    y = operator.simulate(truth, generator=torch.Generator().manual_seed(8))
    bar, callback = _progress(args.ppm_steps, "ppm")
    with bar:
        posterior = reconstruct(y, operator, prior, method="ppm", n_samples=8, steps=args.ppm_steps, seed=0, callback=callback)
    error = (posterior.mean - truth[0]).abs()
    logger.info("posterior mean |error| in the hidden square: %.3f; mean std there: %.3f",
                float(error[:, 10:22, 10:22].mean()), float(posterior.std[:, 10:22, 10:22].mean()))
    _save_posterior_figure(args.out / "inpainting_posterior.png", truth, y, posterior)
    logger.info("demo outputs written to %s", args.out)
    return 0


def _save_posterior_figure(path: Path, truth, y, posterior) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("truth", truth[0, 0]), ("measurement", y[0, 0]), ("posterior mean", posterior.mean[0]), ("posterior std", posterior.std[0])]
    panels += [(f"sample {i + 1}", posterior.samples[i, 0]) for i in range(3)]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.0 * len(panels), 2.3))
    for ax, (title, image) in zip(axes, panels):
        is_std = title == "posterior std"
        ax.imshow(image.detach().numpy(), cmap="magma" if is_std else "gray", vmin=None if is_std else -1, vmax=None if is_std else 1)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
