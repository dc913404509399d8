"""Amortized PPM against particle PPM and DPS on held-out measurements, microscopy and VLBI.

Microscopy: synthetic filament images (the family of the shipped prior) on a 64x64 grid of
31.3 nm pixels. They are blurred with the PSF from the BioSR 488 nm OTF in sample_data/ and
averaged 2x2 onto 62.6 nm camera pixels. Gaussian noise of std 0.05 is added in the prior's
units, where the image spans about [-1, 1]. VLBI: ring images (the family of the shipped ring prior) observed
with the (u, v) coverage and closure sigmas of M87, 2017 April 11, with 2% systematic noise.

The amortized generators are trained here, on measurements only, then all three methods
reconstruct the same held-out measurements. Time per sample is the wall time of a method on
one measurement divided by its number of samples (for the amortized model: the generator
passes only, after loading). Training time is reported apart.

    python benchmarks/amortized.py --update docs/benchmarks.md docs/amortized.md
"""

from __future__ import annotations

import argparse
import io
import logging
import platform
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch

from ppm_core import reconstruct
from ppm_core.operators import SignalDependentNoise
from ppm_core.priors import load_prior
from ppm_core.training.amortized import AmortizedConfig, train_amortized
from ppm_core.training.data import SyntheticSource
from ppm_napari import metrics
from ppm_napari.operator import SuperResolution
from ppm_napari.psf import psf_from_otf
from ppm_napari.superres import MICROSCOPY_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
OTF = ROOT / "sample_data" / "biosr_mt" / "TIRF488_cam1_0_z30_OTF2d.mrc"
UVFITS = ROOT / "sample_data" / "eht" / "SR1_M87_2017_101_hi_hops_netcal_StokesI.uvfits"
MICRO_PRIOR = ROOT / "ppm_napari" / "models" / "filaments-sim"
EHT_PRIOR = ROOT / "ppm_eht" / "models" / "rings-64"
NOISE_STD = 0.05
FINE = 64
HEADINGS = {"micro": "## Amortized inference: microscopy", "eht": "## Amortized inference: VLBI"}
EXACT_HEADING = "## Exact posteriors of amortized inference"
#: (label, training options) of the exact-posterior table
EXACT_RUNS = [
    ("ppm, auxiliary conditioned on y (default)", {}),
    ("ppm, marginal auxiliary (the paper's form)", {"aux_condition": "none"}),
    ("ikl (DAVI), auxiliary conditioned on y", {"objective": "ikl"}),
    ("ikl (DAVI), marginal auxiliary", {"objective": "ikl", "aux_condition": "none"}),
]


def scores(samples: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    mean = samples.mean(0)
    result = metrics.evaluate(samples, mean, truth)
    return {"psnr": result["psnr_fitted"], "ssim": result["ssim_fitted"], "coverage": result["coverage_90"] or float("nan"),
            "diversity": result["diversity"]}


def timed(function):
    start = time.perf_counter()
    value = function()
    return value, time.perf_counter() - start


def micro_task(args, workdir: Path):
    prior = load_prior(MICRO_PRIOR)
    psf = psf_from_otf(OTF, 31.3)
    variance = NOISE_STD**2
    operator = SuperResolution(psf, 2, (FINE // 2, FINE // 2), noise=SignalDependentNoise(0.0, variance, variance))
    source = SyntheticSource("filaments")
    generator = torch.Generator().manual_seed(1)
    train_x = source.sample(args.train, FINE, generator)
    test_x = source.sample(args.test, FINE, torch.Generator().manual_seed(2))
    with torch.no_grad():
        train_y = operator.simulate(train_x, generator=generator)
        test_y = operator.simulate(test_x, generator=torch.Generator().manual_seed(3))
    config = AmortizedConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, checkpoint_every=args.steps, log_every=100)
    model, train_seconds = timed(lambda: train_amortized(train_y, operator, prior, workdir / "micro", config))
    runs = {
        "ppm amortized": lambda y, seed: model.sample(y, args.samples, seed=seed).samples,
        "ppm particles": lambda y, seed: reconstruct(y, operator, prior, method="ppm", n_samples=args.particles, seed=seed, **MICROSCOPY_DEFAULTS["ppm"]).samples,
        "dps": lambda y, seed: reconstruct(y, operator, prior, method="dps", n_samples=args.particles, seed=seed, **MICROSCOPY_DEFAULTS["dps"]).samples,
    }
    truths = [x[0].double().numpy() for x in test_x]
    return evaluate_runs(runs, test_y, truths, lambda s: s[:, 0].double().numpy()), train_seconds, model


def eht_task(args, workdir: Path):
    from ppm_eht.amortized import compact_source, synthetic_observations
    from ppm_eht.data import UAS, load_uvfits
    from ppm_eht.reconstruct import EHT_DEFAULTS, center_image, closure_problem

    prior = load_prior(EHT_PRIOR)
    problem = closure_problem(load_uvfits(UVFITS), prior, 64, 160.0)
    operator = problem.operator
    _, train_y = synthetic_observations(problem, args.train, seed=1)
    test_x, test_y = synthetic_observations(problem, args.eht_test, seed=2)
    config = AmortizedConfig(steps=args.eht_steps, batch_size=args.batch_size, lr=args.lr, checkpoint_every=args.eht_steps, log_every=100)
    model, train_seconds = timed(lambda: train_amortized(train_y.float(), operator, prior, workdir / "eht", config,
                                                         reference=compact_source(problem)))
    psize = problem.data.psize / UAS

    def to_images(samples):
        with torch.no_grad():
            jy = operator.to_jy(samples.double())[:, 0].numpy()
        return np.stack([center_image(s, psize) for s in jy])

    ppm_options = dict(EHT_DEFAULTS["ppm"])
    dps_options = dict(EHT_DEFAULTS["dps"])
    runs = {
        "ppm amortized": lambda y, seed: model.sample(y.float(), args.samples, seed=seed).samples,
        "ppm particles": lambda y, seed: reconstruct(y.float(), operator, prior, method="ppm", n_samples=args.particles, seed=seed, **ppm_options).samples,
        "dps": lambda y, seed: reconstruct(y.float(), operator, prior, method="dps", n_samples=args.particles, seed=seed, **dps_options).samples,
    }
    truths = [to_images(x[None])[0] for x in test_x]
    return evaluate_runs(runs, test_y, truths, to_images), train_seconds, model


def evaluate_runs(runs, test_y, truths, to_images) -> dict[str, dict[str, float]]:
    table = {}
    for name, run in runs.items():
        rows = []
        for index, (y, truth) in enumerate(zip(test_y, truths)):
            samples, seconds = timed(lambda: run(y, index))
            images = to_images(samples)
            rows.append(scores(images, truth) | {"seconds per sample": seconds / images.shape[0], "samples": images.shape[0]})
            logging.getLogger("bench").info("%s, measurement %d: %s", name, index, rows[-1])
        table[name] = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    return table


def exact_task(workdir: Path) -> None:
    """Amortized samples against the exact posterior of 5 held-out measurements (d = 16, m = 8)."""
    from ppm_core.problems import linear_gaussian_problem

    problem = linear_gaussian_problem()
    generator = torch.Generator().manual_seed(1)
    train_y = problem.operator.simulate(problem.prior.sample(4000, generator), generator=generator)
    held_out = torch.Generator().manual_seed(99)
    test_y = problem.operator.simulate(problem.prior.sample(5, held_out), generator=held_out)
    print(f"{EXACT_HEADING}\n")
    print("Prior N(0, C) in d = 16 (variances 1 to 0.1 on random axes), y = A x + noise with a random 8 x 16 matrix and noise std 0.2 "
          "(`ppm_core.problems.linear_gaussian_problem`). The generator is trained on 4000 measurements (6000 steps, batch 64, "
          "lr 1e-3 with decay, 2 auxiliary steps per step) and evaluated on 5 held-out measurements with 4000 samples each "
          "against their exact posteriors (the posterior covariance is the same for every y). Columns: the largest "
          "|sample mean - exact mean| / exact std over coordinates and measurements, and the range and median over coordinates "
          "and measurements of sample std / exact std. 4000 samples alone give the mean to 0.016 std and the std to 1.1% "
          "(one standard error).\n")
    print("| training | max mean error / std | std ratio min - max | median std ratio | training s |")
    print("|---|---|---|---|---|")
    for label, options in EXACT_RUNS:
        config = AmortizedConfig(steps=6000, batch_size=64, lr=1e-3, aux_steps=2, checkpoint_every=10**6, log_every=1000, **options)
        model, seconds = timed(lambda: train_amortized(train_y, problem.operator, problem.prior, workdir / label[:3], config))
        worst, ratios = 0.0, []
        for index, y in enumerate(test_y):
            exact = problem.prior.posterior(problem.operator.matrix, 0.2, y[None])
            std = exact.cov.diagonal().sqrt()
            samples = model.sample(y, 4000, seed=index).samples.reshape(4000, -1)
            worst = max(worst, float(((samples.mean(0) - exact.mean.reshape(-1)).abs() / std).max()))
            ratios.append(samples.std(0) / std)
        ratio = torch.cat(ratios)
        print(f"| {label} | {worst:.3f} | {float(ratio.min()):.3f} - {float(ratio.max()):.3f} | {float(ratio.median()):.3f} | {seconds:.0f} |")
    print()


def print_table(title: str, table: dict, train_seconds: float, steps: int, n_test: int) -> None:
    print(f"### {title}\n")
    print(f"Held-out measurements: {n_test}; amortized training: {steps} steps, {train_seconds / 60:.1f} min. "
          "Values are means over the held-out measurements.\n")
    print("| method | samples | PSNR (dB) | SSIM | 90% coverage | diversity | s per sample | speed-up vs particles |")
    print("|---|---|---|---|---|---|---|---|")
    reference = table["ppm particles"]["seconds per sample"]
    for name, row in table.items():
        print(f"| {name} | {row['samples']:.0f} | {row['psnr']:.2f} | {row['ssim']:.3f} | {row['coverage']:.2f} | {row['diversity']:.4f} "
              f"| {row['seconds per sample']:.4g} | {reference / row['seconds per sample']:.0f}x |")
    loss = table["ppm particles"]["psnr"] - table["ppm amortized"]["psnr"]
    speed = reference / table["ppm amortized"]["seconds per sample"]
    print(f"\nTargets: speed-up {speed:.0f}x (target >= 100x: {'met' if speed >= 100 else 'NOT met'}); "
          f"PSNR loss against particle PPM {loss:.2f} dB (target <= 1 dB: {'met' if loss <= 1 else 'NOT met'}).\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="amortized training steps, microscopy")
    parser.add_argument("--eht-steps", type=int, default=2000, help="amortized training steps, VLBI")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--train", type=int, default=512, help="training measurements per task")
    parser.add_argument("--test", type=int, default=4, help="held-out microscopy measurements")
    parser.add_argument("--eht-test", type=int, default=2, help="held-out VLBI observations")
    parser.add_argument("--samples", type=int, default=16, help="amortized samples per measurement")
    parser.add_argument("--particles", type=int, default=8, help="particles (PPM) and runs (DPS) per measurement")
    parser.add_argument("--tasks", nargs="+", choices=["micro", "eht", "exact"], default=["exact", "micro", "eht"],
                        help="tasks to run; each writes its own section")
    parser.add_argument("--update", type=Path, nargs="+", default=[], help="Markdown pages whose section to replace")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(0)

    for task in args.tasks:
        buffer = io.StringIO()
        with tempfile.TemporaryDirectory() as tmp, redirect_stdout(buffer):
            if task == "exact":
                exact_task(Path(tmp))
            else:
                print(f"{HEADINGS[task]}\n")
                print(f"`python benchmarks/amortized.py --tasks {task}` on {platform.processor() or platform.machine()}, "
                      f"{torch.get_num_threads()} torch threads, torch {torch.__version__}. Training measurements: {args.train}, "
                      f"batch {args.batch_size}, lr {args.lr}. PPM particles and DPS runs: {args.particles} per measurement; "
                      f"amortized samples: {args.samples}. PSNR and SSIM of the posterior mean after an affine fit to the truth; "
                      "coverage of the 90% central interval per pixel.\n")
                if task == "micro":
                    table, seconds, _ = micro_task(args, Path(tmp))
                    print_table("2x super-resolution of synthetic filaments (64x64, BioSR 488 nm OTF, noise 0.05)", table, seconds,
                                args.steps, args.test)
                else:
                    table, seconds, _ = eht_task(args, Path(tmp))
                    print_table("Ring images with the M87 2017-04-11 coverage (64x64, 160 uas)", table, seconds, args.eht_steps, args.eht_test)
        _publish(buffer.getvalue(), args.update, EXACT_HEADING if task == "exact" else HEADINGS[task])


def _publish(text: str, pages: list[Path], heading: str) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _page import replace_section

    print(text)
    for page in pages:
        replace_section(page, heading, text)


if __name__ == "__main__":
    main()
