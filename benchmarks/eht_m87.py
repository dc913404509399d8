"""EHT M87 2017 and synthetic observations: PPM against RED-Diff, DPS and ehtim's RML imaging.

Each (data set, method) runs ``ppm eht reconstruct`` (or ``ppm eht rml``) in its own process, so
wall time and peak memory are those of one run. Real data: M87, 2017 April 11 (``sample_data``),
and April 5 and 6 when ``../shared/data/eht`` is present. Synthetic data: the two model images
of ``sample_data/eht`` observed by ``ppm eht simulate`` with the April 11 coverage and sigmas,
10% station gain errors and random phases, at 0.6 Jy. The ring prior saw augmented copies of
these two models in training, so the synthetic rows are in its training distribution.

The script prints a Markdown section; ``--update PAGE`` replaces that section of PAGE, and
``--figure`` writes the posterior means, PPM's std and the RML images.

    python benchmarks/eht_m87.py --update docs/benchmarks.md --figure docs/eht_m87.png
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "eht"
SHARED = ROOT.parent / "shared" / "data" / "eht"
M87 = {"2017-04-11": SAMPLE / "SR1_M87_2017_101_hi_hops_netcal_StokesI.uvfits",
       "2017-04-05": SHARED / "SR1_M87_2017_095_hi_hops_netcal_StokesI.uvfits",
       "2017-04-06": SHARED / "SR1_M87_2017_096_hi_hops_netcal_StokesI.uvfits"}
MODELS = {"avery model": SAMPLE / "avery_sgra_eofn.txt", "jason model": SAMPLE / "jason_mad_eofn.txt"}
METHODS = ("ppm", "red-diff", "dps", "rml")
HEADING = "## VLBI: EHT M87 2017"
NPIX, FOV = 64, 160.0


def ppm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ppm_core.cli", "-q", "eht", *args], check=True, env=os.environ | {"TQDM_DISABLE": "1"})


def run(uvfits: Path, method: str, workdir: Path, samples: int) -> dict:
    stem = workdir / f"{uvfits.stem}_{method}"
    start = time.perf_counter()
    if method == "rml":
        ppm("rml", str(uvfits), "--out", f"{stem}.fits", "--summary-json", f"{stem}.json")
    else:
        ppm("reconstruct", str(uvfits), "--method", method, "--samples", str(samples), "--out", f"{stem}.fits",
            "--summary-json", f"{stem}.json")
    wall = time.perf_counter() - start
    summary = json.loads(Path(f"{stem}.json").read_text())
    if method == "rml":
        from ppm_eht.data import import_ehtim, quiet

        image = quiet(import_ehtim().image.load_fits, f"{stem}.fits")
        mean = image.imvec.reshape(image.ydim, image.xdim)
        samples_arr = mean[None]
    else:
        from ppm_eht.io import read_posterior_fits

        posterior = read_posterior_fits(f"{stem}.fits")
        mean, samples_arr = posterior["mean"], posterior["samples"]
    return {"summary": summary, "wall_s": wall, "mean": mean, "samples": samples_arr}


def truth_image(model: Path, like: Path):
    """Return the model regridded to the reconstruction grid, at the observation's position, 0.6 Jy."""
    from ppm_eht.data import UAS, load_uvfits, quiet
    from ppm_eht.io import load_model_image

    obs = load_uvfits(like)
    image = load_model_image(model)
    image.ra, image.dec, image.rf, image.mjd, image.source = obs.ra, obs.dec, obs.rf, obs.mjd, obs.source
    image = quiet(image.regrid_image, FOV * UAS, NPIX)
    image.imvec *= 0.6 / image.total_flux()
    return image, quiet(obs.res)


def blurred_correlation(estimate: np.ndarray, truth, beam: float) -> float:
    """Normalized cross-correlation of estimate and truth, both blurred to the nominal beam,
    maximized over (periodic) shifts, because closure data leave the position free."""
    a = truth.copy()
    a.imvec = np.asarray(estimate, dtype=np.float64).reshape(-1)
    x = a.blur_circ(beam).imvec.reshape(NPIX, NPIX)
    y = truth.blur_circ(beam).imvec.reshape(NPIX, NPIX)
    x, y = x - x.mean(), y - y.mean()
    cross = np.fft.ifft2(np.fft.fft2(x) * np.conj(np.fft.fft2(y))).real
    return float(cross.max() / np.sqrt((x * x).sum() * (y * y).sum()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--update", type=Path, default=None, help="Markdown page whose VLBI section to replace")
    parser.add_argument("--workdir", type=Path, default=None, help="keep every run's files here (default: a temporary folder)")
    args = parser.parse_args()
    from ppm_napari.metrics import diversity

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        datasets = {f"M87 {day}": (path, None) for day, path in M87.items() if path.is_file()}
        for name, model in MODELS.items():
            out = workdir / f"{model.stem}_sim.uvfits"
            ppm("simulate", str(model), "--like", str(M87["2017-04-11"]), "--out", str(out), "--total-flux", "0.6",
                "--gain-error", "0.1", "--phase-error", "--seed", "1")
            datasets[f"synthetic {name}"] = (out, model)
        for name, (path, model) in datasets.items():
            truth = truth_image(model, path) if model is not None else None
            for method in args.methods:
                print(f"running {method} on {name}", file=sys.stderr, flush=True)
                result = run(path, method, workdir, args.samples)
                result["diversity"] = diversity(result["samples"]) if len(result["samples"]) > 1 else 0.0
                result["correlation"] = blurred_correlation(result["mean"], *truth) if truth is not None else None
                if truth is not None:
                    result["truth"] = truth[0].imvec.reshape(NPIX, NPIX)
                rows[name, method] = result

    page = io.StringIO()
    with contextlib.redirect_stdout(page):
        table(rows, args.samples)
    if args.update is not None:
        from _page import replace_section

        replace_section(args.update, HEADING, page.getvalue())
    else:
        sys.stdout.write(page.getvalue())
    if args.figure is not None:
        figure(rows, args.figure)
    return 0


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ring(summary: dict, method: str) -> tuple[str, str, str, str]:
    """Diameter, width, position angle and the number of samples with a ring."""
    ring = summary.get("ring")
    if ring is None:
        return "n/a", "n/a", "n/a", "0"
    if method == "rml":
        return _fmt(ring["diameter"], ".1f"), _fmt(ring["width"], ".1f"), _fmt(ring["position_angle"], ".0f"), "1"
    parts = []
    for key, spec in (("diameter", ".1f"), ("width", ".1f"), ("position_angle", ".0f")):
        entry = ring[key]
        parts.append(f"{_fmt(entry.get('mean'), spec)} ± {_fmt(entry.get('std'), spec)}" if entry.get("mean") is not None else "n/a")
    return (*parts, str(ring["diameter"]["n_rings"]))


def table(rows: dict, samples: int) -> None:
    print(f"{HEADING}: posterior imaging from closure products (`benchmarks/eht_m87.py`)\n")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads = default; "
          f"{samples} samples per posterior method; {NPIX}x{NPIX} pixels over {FOV:g} uas; shipped ring prior; 2% systematic "
          "noise; closure phases and log closure amplitudes only (plus the total flux from the intra-site baselines).")
    print("chi2: ehtim's reduced chi-squares of closure phases (cp) and log closure amplitudes (lca), the median over "
          "samples with the range. Ring: diameter, width (FWHM) and position angle of the bright side (deg east of "
          "north), posterior mean ± std over samples (`ppm_eht.features`, REx definitions). The EHT collaboration "
          "published a ring diameter of 42 ± 3 uas for M87 (2019, Paper I). Correlation: blurred to the nominal beam, "
          "mean against the model, maximized over shifts (synthetic data). Rings: samples in which REx finds a ring (peak "
          "radii spread by at most 30%); only those enter the ring columns. Diversity: mean pairwise 1 - cos of background-subtracted samples. "
          "Memory: peak resident set size of the run's process.\n")
    print("| data | method | chi2 cp | chi2 lca | diameter (uas) | width (uas) | PA (deg) | rings | correlation | diversity | wall time (s) | peak memory (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, method), r in rows.items():
        s = r["summary"]
        chi = s["reduced_chisq"]
        if method == "rml":
            cp, lca = _fmt(chi.get("cphase"), ".2f"), _fmt(chi.get("logcamp"), ".2f")
            label = "ehtim RML"
        else:
            cp, lca = (f"{chi[k]['median']:.2f} ({min(chi[k]['samples']):.2f}-{max(chi[k]['samples']):.2f})" if k in chi else "n/a"
                       for k in ("cphase", "logcamp"))
            label = method.upper() if method == "ppm" else method
        d, w, pa, n_rings = _ring(s, method)
        corr = "-" if r["correlation"] is None else f"{r['correlation']:.3f}"
        memory = s.get("peak_memory_mb")
        print(f"| {name} | {label} | {cp} | {lca} | {d} | {w} | {pa} | {n_rings} | {corr} | {r['diversity']:.3f} | {r['wall_s']:.0f} | "
              f"{'n/a' if memory is None else format(memory, '.0f')} |")
    print()


def figure(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ppm_core.io import atomic_path

    names = list(dict.fromkeys(name for name, _ in rows))
    methods = list(dict.fromkeys(method for _, method in rows))
    columns = ["truth", *methods, "ppm std"]
    fig, axes = plt.subplots(len(names), len(columns), figsize=(2.2 * len(columns), 2.3 * len(names)), constrained_layout=True)
    axes = np.atleast_2d(axes)
    extent = (FOV / 2, -FOV / 2, -FOV / 2, FOV / 2)
    for i, name in enumerate(names):
        for j, column in enumerate(columns):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if column == "truth":
                truth = next((r.get("truth") for (n, _), r in rows.items() if n == name and "truth" in r), None)
                if truth is None:
                    ax.set_frame_on(False)  # keeps the row label
                    continue
                image, title = truth, "model"
            elif column == "ppm std":
                if (name, "ppm") not in rows:
                    ax.axis("off")
                    continue
                samples = rows[name, "ppm"]["samples"]
                ax.imshow(samples.std(0, ddof=1), cmap="inferno", extent=extent)
                ax.set_title("PPM std", fontsize=8)
                continue
            else:
                if (name, column) not in rows:
                    ax.axis("off")
                    continue
                image, title = rows[name, column]["mean"], ("ehtim RML" if column == "rml" else f"{column} mean")
            ax.imshow(image, cmap="afmhot", vmin=0, extent=extent)
            ax.set_title(title, fontsize=8)
        axes[i, 0].set_ylabel(name, fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
