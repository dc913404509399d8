"""Calibration of the posterior spread, direction by direction, on two image problems with exact posteriors.

Every method runs with 64 particles (or runs) on one measurement. The table gives the median
of particle std / exact std over each eighth of the posterior's eigen-directions, from the most
data-constrained to the least, so a collapse in some directions cannot hide behind a per-pixel
average. A second table gives each trained auxiliary's fit to the final particles.

    python benchmarks/calibration.py --problem field --figure docs/calibration_field.png --update docs/benchmarks.md docs/calibration.md
"""

from __future__ import annotations

import argparse
import io
import platform
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch

from ppm_core import reconstruct
from ppm_core.metrics import band_spread_ratios
from ppm_core.problems import gaussian_field_problem, masked_blur_problem

BANDS = 8
PARTICLES = 64
#: (label, method, options, steps or None for the method's default, problems it runs on)
RUNS = [
    ("ppm (default)", "ppm", {}, None, ("field", "blur")),
    ("ppm, 3000 steps", "ppm", {}, 3000, ("field", "blur-long")),
    ("ppm, 4 aux steps per particle step", "ppm", {"aux_steps": 4}, None, ("field",)),
    ("ppm, aux without likelihood feature", "ppm", {"aux_feature": False}, None, ("field", "blur")),
    ("ppm, aux without likelihood feature, 3000 steps", "ppm", {"aux_feature": False}, 3000, ("field",)),
    ("ppm, kernel-density aux", "ppm", {"aux": "kde", "sigma_min": 0.05}, None, ("field", "blur")),
    ("ppm, Gaussian fitted to the 64 particles", "ppm", {"aux": "gaussian"}, None, ("field", "blur")),
    ("ppm-sim (first network only)", "ppm-sim", {}, None, ("field", "blur")),
    ("ikl", "ikl", {}, None, ("field", "blur")),
    ("red-diff", "red-diff", {}, None, ("field", "blur")),
    ("rlsd", "rlsd", {}, None, ("field", "blur")),
    ("dps", "dps", {}, None, ("field", "blur")),
]
PROBLEMS = {"field": gaussian_field_problem, "blur": masked_blur_problem}


def measure(problem, method, options, steps):
    start = time.perf_counter()
    posterior = reconstruct(problem.y, problem.operator, problem.prior, method=method, n_samples=PARTICLES, steps=steps, seed=0, **options)
    wall = time.perf_counter() - start
    exact = problem.posterior
    flat = posterior.samples.reshape(PARTICLES, -1).double()
    mean_error = ((flat.mean(0) - exact.mean.reshape(-1)).abs() / exact.cov.diagonal().sqrt()).median()
    return band_spread_ratios(flat, exact.cov, BANDS), float(mean_error), wall, posterior.diagnostics.get("auxiliary fit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", choices=sorted(PROBLEMS), required=True)
    parser.add_argument("--update", type=Path, nargs="+", default=[], help="Markdown pages whose section for this problem to replace")
    parser.add_argument("--figure", type=Path, default=None, help="PNG of the band ratios of every method")
    parser.add_argument("--long", action="store_true", help="run only the rows too slow for the full table of this problem, in their own section")
    args = parser.parse_args()
    selection = f"{args.problem}-long" if args.long else args.problem

    problem = PROBLEMS[args.problem]()
    exact = problem.posterior
    eigenvalues = torch.linalg.eigvalsh(exact.cov)
    prior_cov = problem.prior.cov.double()
    _, vectors = torch.linalg.eigh(exact.cov)
    prior_std = ((vectors.T @ prior_cov) * vectors.T).sum(1).sqrt()

    results = []
    for label, method, options, steps, problems in RUNS:
        if selection in problems:
            results.append((label, method, steps) + measure(problem, method, options, steps))
    # Sampling noise of the statistic itself: 64 independent exact draws.
    floor = band_spread_ratios(problem.exact_samples(PARTICLES, seed=1), exact.cov, BANDS)

    page = io.StringIO()
    with redirect_stdout(page):
        heading = ("## Calibration, longer runs: " if args.long else "## Calibration: ") + problem.name
        print(heading + "\n")
        print(f"`python benchmarks/calibration.py --problem {args.problem}{' --long' if args.long else ''}`: {PARTICLES} particles (or runs), seed 0, the method's default "
              f"iterations unless stated (ppm 1000, red-diff 1000, dps 250); torch {torch.__version__}, "
              f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s).")
        print(f"d = {eigenvalues.numel()}. Posterior std per band (mean over its directions): "
              + ", ".join(f"{float(c.sqrt().mean()):.3g}" for c in eigenvalues.chunk(BANDS))
              + "; prior std along the same directions: " + ", ".join(f"{float(c.mean()):.3g}" for c in prior_std.chunk(BANDS)) + ".")
        print("Band k: median over the k-th eighth of the posterior's eigen-directions (1 = the most data-constrained) of "
              "particle std / exact std; 1 is calibrated. Mean error: median over pixels of |mean - exact mean| / exact std.\n")
        columns = [f"band {k + 1}" for k in range(BANDS)]
        print("| method | " + " | ".join(columns) + " | mean error | wall time (s) |")
        print("|---|" + "---|" * (BANDS + 2))
        for label, method, steps, bands, mean_error, wall, _ in results:
            print(f"| {label} | " + " | ".join(f"{v:.2f}" for v in bands) + f" | {mean_error:.3f} | {wall:.0f} |")
        print("| 64 exact posterior draws (sampling floor) | " + " | ".join(f"{v:.2f}" for v in floor) + " | | |")
        fits = [(label, fit) for label, *_, fit in results if fit]
        if fits:
            bands_sigma = list(fits[0][1])
            print("\nAuxiliary fit at the end of the run: its denoising error on fresh noisy copies of the particles "
                  "divided by the prior's, per noise band (1 = it has learned nothing beyond the prior).\n")
            print("| method | " + " | ".join(bands_sigma) + " |")
            print("|---|" + "---|" * len(bands_sigma))
            for label, fit in fits:
                print(f"| {label} | " + " | ".join(f"{fit[k]:.3f}" for k in bands_sigma) + " |")
    print(page.getvalue(), end="")
    for path in args.update:
        from _page import replace_section

        replace_section(path, heading, page.getvalue())
    if args.figure:
        save_figure(args.figure, problem.name, results, floor)


def save_figure(path: Path, title: str, results, floor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from _page import save_png

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    bands = range(1, BANDS + 1)
    ax.axhspan(0.9, 1.1, color="0.9", label="0.9-1.1")
    colours = plt.get_cmap("tab20").colors
    for index, (label, _, _, ratios, *_) in enumerate(results):
        style = {"lw": 2.5, "color": "black"} if label == "ppm (default)" else {"lw": 1, "color": colours[(2 * index) % 20 + (2 * index) // 20]}
        ax.plot(bands, ratios, marker="o", ms=3, label=label, **style)
    ax.plot(bands, floor, ls="--", color="0.4", label="64 exact draws")
    ax.set_yscale("log")
    ax.set_xlabel("band of posterior eigen-directions (1 = most constrained by the data)")
    ax.set_ylabel("particle std / exact std")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    save_png(fig, path)


if __name__ == "__main__":
    main()
