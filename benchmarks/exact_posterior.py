"""Every inference method against posteriors known in closed form.

Prints Markdown tables (one run produces every number) and writes a scatter plot of
particles against exact posterior samples for the mixture problems. The image problems, with
every band of posterior directions, are in ``benchmarks/calibration.py``.

    python benchmarks/exact_posterior.py --figure docs/mixture_particles.png > docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from ppm_core import reconstruct
from ppm_core.metrics import band_spread_ratios, interval_coverage, sliced_wasserstein
from ppm_core.problems import linear_gaussian_problem, mixture_problem, mode_assignment

RUNS = [
    ("ppm", {"aux": "residual"}, "ppm, learned residual aux (default)"),
    ("ppm", {"aux": "residual", "aux_feature": False}, "ppm, residual aux without likelihood feature"),
    ("ppm", {"aux": "kde", "sigma_min": 0.05}, "ppm, kernel-density aux"),
    ("ppm", {"aux": "gaussian"}, "ppm, Gaussian-fit aux (oracle)"),
    ("ppm-sim", {"aux": "residual"}, "ppm-sim (first network only)"),
    ("ikl", {"aux": "residual"}, "ikl"),
    ("red-diff", {}, "red-diff"),
    ("rlsd", {}, "rlsd"),
    ("dps", {}, "dps"),
]


def evaluate(problem, method, options, n_particles, steps):
    start = time.perf_counter()
    run_steps = 200 if method == "dps" else steps
    posterior = reconstruct(problem.y, problem.operator, problem.prior, method=method, n_samples=n_particles, steps=run_steps, seed=0, **options)
    wall = time.perf_counter() - start
    samples = posterior.samples.reshape(n_particles, -1)
    exact = problem.exact_samples(20000).reshape(20000, -1)
    exact_std = exact.std(0)
    row = {
        "mean error / std": float(((samples.mean(0) - exact.mean(0)).abs() / exact_std).median()),
        "std ratio": float((samples.std(0) / exact_std).median()),
        "90% coverage": interval_coverage(samples, exact, 0.9),
        "sliced W2": sliced_wasserstein(samples, exact[:n_particles]),
        "wall time (s)": wall,
    }
    return posterior, row


def print_table(title, rows, columns):
    print(f"\n### {title}\n")
    print("| method | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, row in rows:
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--figure", default=None, help="PNG path for the mixture scatter plot")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    print("## Exact-posterior benchmark\n")
    print(f"`python benchmarks/exact_posterior.py`: {args.particles} particles (or runs), {args.steps} iterations (DPS: 200 steps), seed 0; "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads.")
    print("Columns: median over coordinates of |mean error| / exact std and of particle std / exact std; fraction of 20000 exact "
          "posterior draws inside the particles' per-coordinate 90% interval (ideal 0.90); sliced 2-Wasserstein distance "
          "to as many exact draws (the floor row is the distance between two independent exact sets).")

    gaussian = linear_gaussian_problem()
    mixtures = [mixture_problem(), mixture_problem(projection=(1.0, -1.5), y_value=0.8)]
    columns = ["mean error / std", "std ratio", "90% coverage", "sliced W2", "wall time (s)"]
    band_rows = []
    scatter = {}

    for problem in [gaussian, *mixtures]:
        rows = []
        for method, options, label in RUNS:
            posterior, row = evaluate(problem, method, options, args.particles, args.steps)
            if problem is gaussian:
                band_rows.append((label, dict(zip(["band 1 (most constrained)", "band 2", "band 3", "band 4 (least)"], band_spread_ratios(posterior.samples, problem.posterior.cov, 4)))))
            else:
                labels = mode_assignment(posterior.samples, problem.posterior)
                row["share of mode 2"] = float((labels == 1).double().mean())
                scatter[(problem.name, label)] = posterior.samples.reshape(args.particles, 2)
            rows.append((label, row))
        exact_a, exact_b = problem.exact_samples(args.particles, seed=1), problem.exact_samples(args.particles, seed=2)
        floor = {c: "" for c in columns} | {"sliced W2": sliced_wasserstein(exact_a, exact_b), "90% coverage": interval_coverage(exact_a, problem.exact_samples(20000, seed=3), 0.9)}
        if problem is not gaussian:
            floor["share of mode 2"] = float(problem.posterior.weights[1])
            rows.append(("exact posterior (floor)", floor))
            title = f"{problem.name}: 2-D Gaussian mixture, exact share of mode 2 = {float(problem.posterior.weights[1]):.3f}"
            print_table(title, rows, columns + ["share of mode 2"])
        else:
            rows.append(("exact posterior (floor)", floor))
            print_table("linear-gaussian: d = 16, rank-8 random matrix, noise_std 0.2", rows, columns)
            print_table("linear-gaussian: particle/posterior std by band of posterior eigen-directions (4 per band)",
                        band_rows, ["band 1 (most constrained)", "band 2", "band 3", "band 4 (least)"])

    if args.figure:
        save_scatter(args.figure, mixtures, scatter)


def save_scatter(path, mixtures, scatter):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from _page import save_png

    labels = [label for _, _, label in RUNS]
    fig, axes = plt.subplots(len(mixtures), len(labels), figsize=(2.2 * len(labels), 2.3 * len(mixtures)), sharex=True, sharey=True)
    for row, problem in enumerate(mixtures):
        exact = problem.exact_samples(2000).reshape(-1, 2)
        for col, label in enumerate(labels):
            ax = axes[row, col]
            ax.scatter(exact[:, 0], exact[:, 1], s=2, c="0.75", label="exact")
            particles = scatter[(problem.name, label)]
            ax.scatter(particles[:, 0], particles[:, 1], s=3, c="tab:red", label="particles")
            if row == 0:
                ax.set_title(label, fontsize=7)
            if col == 0:
                ax.set_ylabel(problem.name, fontsize=7)
            ax.tick_params(labelsize=6)
    axes[0, 0].legend(fontsize=6, loc="lower right")
    save_png(fig, path)


if __name__ == "__main__":
    main()
