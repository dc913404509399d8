"""``ppm eht``: posterior imaging, RML imaging and synthetic observations of uvfits files."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

logger = logging.getLogger("ppm.eht")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eht reconstruct``, ``eht rml`` and ``eht simulate`` to the ``ppm`` command."""
    from .reconstruct import METHODS

    eht = subparsers.add_parser("eht", help="VLBI: black-hole imaging with posterior uncertainty from uvfits")
    commands = eht.add_subparsers(dest="eht_command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "reconstruct",
        help="posterior samples of the image behind a uvfits file, from its closure phases and log closure amplitudes",
        description=(
            "Draw posterior samples of the Stokes I image from the closure products of a uvfits file under a "
            "black-hole diffusion prior. Writes FITS (primary HDU the mean, extensions STD and SAMPLE1..n), and "
            "optionally a JSON summary (per-sample chi-squares, ring diameter, width and position angle) and a PNG."
        ),
    )
    p.add_argument("uvfits", type=Path, help="observation (uvfits, read with ehtim)")
    p.add_argument("--out", type=Path, required=True, help="posterior FITS file to write")
    p.add_argument("--npix", type=int, default=64, help="image side in pixels (default: %(default)s)")
    p.add_argument("--fov", type=float, default=160.0, help="field of view in microarcseconds (default: %(default)s)")
    p.add_argument("--method", choices=METHODS, default="ppm", help="posterior method (default: %(default)s)")
    p.add_argument("--samples", type=int, default=16, help="posterior samples (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="iterations (default: the method's VLBI default)")
    p.add_argument("--prior", type=Path, default=None, help="prior folder (default: the shipped ring prior)")
    p.add_argument("--total-flux", type=float, default=None, help="total flux in Jy (default: from the intra-site baselines)")
    p.add_argument("--systematic-noise", type=float, default=0.02,
                   help="fractional systematic noise added to amplitudes before closures are formed (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--summary-json", type=Path, default=None, help="write chi-squares and ring features as JSON")
    p.add_argument("--plot", type=Path, default=None, help="write the summary figure (PNG)")
    p.add_argument("--amortized", type=Path, default=None, metavar="MODEL",
                   help="draw the samples in one pass each with an amortized model (ppm train-amortized eht) trained on this "
                        "observation's coverage; its grid and systematic noise are used, and --method/--steps/--prior do not apply")
    p.set_defaults(func=run_reconstruct)

    p = commands.add_parser(
        "rml",
        help="ehtim's regularized maximum-likelihood image of the same data, for comparison",
        description="Image a uvfits file with ehtim's RML imager from closure phases and log closure amplitudes, with the "
                    "regularizer types of the EHT collaboration's fiducial ehtim M87 script (relative entropy to a Gaussian, TV, "
                    "TV2, total flux), no self-calibration, and blurred restarts. Writes an ehtim FITS image.",
    )
    p.add_argument("uvfits", type=Path, help="observation (uvfits)")
    p.add_argument("--out", type=Path, required=True, help="FITS image to write")
    p.add_argument("--npix", type=int, default=64, help="image side in pixels (default: %(default)s)")
    p.add_argument("--fov", type=float, default=160.0, help="field of view in microarcseconds (default: %(default)s)")
    p.add_argument("--total-flux", type=float, default=None, help="total flux in Jy (default: from the intra-site baselines)")
    p.add_argument("--systematic-noise", type=float, default=0.02, help="fractional systematic noise (default: %(default)s)")
    p.add_argument("--prior-fwhm", type=float, default=40.0, help="FWHM of the Gaussian prior image in uas (default: %(default)s)")
    p.add_argument("--summary-json", type=Path, default=None, help="write chi-squares and ring features as JSON")
    p.set_defaults(func=run_rml)

    p = commands.add_parser(
        "simulate",
        help="observe a model image with the (u, v) coverage and noise of a uvfits file",
        description="Observe a model image (FITS or ehtim text) at the times, baselines and noise levels of a real "
                    "observation, optionally with station gain errors, and write uvfits.",
    )
    p.add_argument("model", type=Path, help="model image: FITS or ehtim text (.txt)")
    p.add_argument("--like", type=Path, required=True, help="observation whose coverage and sigmas to copy (uvfits)")
    p.add_argument("--out", type=Path, required=True, help="uvfits file to write")
    p.add_argument("--total-flux", type=float, default=None, help="rescale the model to this total flux in Jy")
    p.add_argument("--gain-error", type=float, default=0.0, help="fractional station gain errors, 0 for none (default: %(default)s)")
    p.add_argument("--phase-error", action="store_true", help="randomize station phases (an uncalibrated atmosphere)")
    p.add_argument("--no-noise", action="store_true", help="leave out thermal noise")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.set_defaults(func=run_simulate)


def _check_paths(inputs: dict[str, Path | None], outputs: dict[str, Path | None]) -> None:
    from ppm_core.cli import _check_output_file

    seen: dict[Path, str] = {}
    for name, path in {**inputs, **outputs}.items():
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved in seen:
            raise ValueError(f"{name} and {seen[resolved]} are the same file ({path}); the run would overwrite it")
        seen[resolved] = name
    for name, path in outputs.items():
        if path is not None:
            _check_output_file(path, name)


def _write_json(path: Path, payload: dict) -> None:
    from ppm_core.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite(payload), indent=2, default=str, allow_nan=False) + "\n")
    logger.info("wrote %s", path)


def _finite(value):
    """Replace NaN and infinities by None, recursively, so the JSON is valid."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_grid_args(args: argparse.Namespace) -> None:
    if args.npix < 8:
        raise ValueError(f"--npix must be at least 8; got {args.npix}")
    if not args.fov > 0:
        raise ValueError(f"--fov must be a positive field of view in microarcseconds; got {args.fov:g}")
    if args.total_flux is not None and not args.total_flux > 0:
        raise ValueError(f"--total-flux must be positive (Jy); got {args.total_flux:g}")
    if not 0 <= args.systematic_noise < 1:
        raise ValueError(f"--systematic-noise is a fraction in [0, 1); got {args.systematic_noise:g}")


def run_reconstruct(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ppm_core.priors import load_prior
    from ppm_core.priors.network import read_config

    from .data import load_uvfits
    from .reconstruct import DEFAULT_PRIOR, check_grid, prior_pixel_size, reconstruct_obs

    if not args.out.name.lower().endswith((".fits", ".fit", ".fts")):
        raise ValueError(f"--out must end in .fits; got {args.out.name}")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise ValueError(f"--plot must end in .png; got {args.plot.name}")
    _check_paths({"uvfits": args.uvfits}, {"--out": args.out, "--summary-json": args.summary_json, "--plot": args.plot})
    _check_grid_args(args)
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1; got {args.samples}")
    if args.amortized is not None:
        return _run_amortized(args)
    prior_path = args.prior or DEFAULT_PRIOR
    prior_pixel = prior_pixel_size(read_config(prior_path))
    check_grid(args.npix, args.fov, prior_pixel)
    prior = load_prior(prior_path)
    obs = load_uvfits(args.uvfits)

    with tqdm(desc=f"eht {args.method}", unit="step") as bar:

        def report(state: dict) -> None:
            if bar.total is None:
                bar.total = state["steps"]
            bar.update(1)
            losses = state.get("losses", {})
            if "data term" in losses:
                bar.set_postfix(data=f"{losses['data term']:.3g}")

        posterior = reconstruct_obs(obs, prior, npix=args.npix, fov_uas=args.fov, method=args.method, n_samples=args.samples,
                                    steps=args.steps, seed=args.seed, total_flux=args.total_flux,
                                    systematic_noise=args.systematic_noise, prior_pixel_uas=prior_pixel, callback=report)
    posterior.parameters |= {"input": str(args.uvfits), "prior": str(prior_path)}
    _write_outputs(args, posterior, obs, args.method)
    return 0


def _run_amortized(args: argparse.Namespace) -> int:
    from .amortized import reconstruct_amortized
    from .data import load_uvfits

    ignored = [name for name, value, default in (("--method", args.method, "ppm"), ("--steps", args.steps, None), ("--prior", args.prior, None),
                                                   ("--npix", args.npix, 64), ("--fov", args.fov, 160.0),
                                                   ("--systematic-noise", args.systematic_noise, 0.02)) if value != default]
    if ignored:
        logger.warning("with --amortized the model's own settings are used; ignoring %s", ", ".join(ignored))
    obs = load_uvfits(args.uvfits)
    posterior = reconstruct_amortized(obs, args.amortized, n_samples=args.samples, seed=args.seed, total_flux=args.total_flux)
    posterior.parameters |= {"input": str(args.uvfits)}
    logger.info("%d samples in %.2f s with the amortized model %s", args.samples, posterior.seconds, args.amortized)
    _write_outputs(args, posterior, obs, "ppm-amortized")
    return 0


def _write_outputs(args: argparse.Namespace, posterior, obs, method: str) -> None:
    """Write the FITS file, log the summary, and write the optional JSON and PNG."""
    from .io import write_posterior_fits

    write_posterior_fits(args.out, posterior)
    logger.info("wrote %s", args.out)
    summary = posterior.summary()
    ring = summary["ring"]
    chisq = summary["reduced_chisq"]
    logger.info("reduced chi2 per sample (median): %s", ", ".join(f"{k} {v['median']:.2f}" for k, v in chisq.items()))
    if "mean" in ring["diameter"]:
        logger.info("ring diameter %.1f +- %.1f uas, width %.1f +- %.1f uas, bright side at %.0f +- %.0f deg east of north",
                    ring["diameter"]["mean"], ring["diameter"]["std"], ring["width"].get("mean", float("nan")),
                    ring["width"].get("std", float("nan")), ring["position_angle"]["mean"], ring["position_angle"]["std"])
    if args.summary_json is not None:
        _write_json(args.summary_json, summary)
    if args.plot is not None:
        from .plot import summary_figure

        summary_figure(posterior, args.plot, title=f"{obs.source} MJD {int(obs.mjd)}: {method}, {args.samples} samples")
        logger.info("wrote %s", args.plot)


def add_train_amortized(commands: argparse._SubParsersAction, add_training_arguments) -> None:
    """Add ``train-amortized eht``."""
    from ppm_core.training.data import SYNTHETIC_GENERATORS

    p = commands.add_parser(
        "eht",
        help="train on simulated observations with the (u, v) coverage and closure sigmas of a uvfits file",
        description="Simulate many observations of synthetic sources with the coverage and closure uncertainties of a uvfits "
                    "file and train an amortized generator on their closure products (no images are used in training). "
                    "`ppm eht reconstruct OBS --amortized MODEL` then draws samples for observations with that coverage.",
    )
    p.add_argument("uvfits", type=Path, help="observation whose coverage and closure sigmas to use (uvfits)")
    p.add_argument("--observations", type=int, default=512, help="simulated observations in the training set (default: %(default)s)")
    p.add_argument("--images", choices=sorted(SYNTHETIC_GENERATORS), default="rings",
                   help="synthetic generator of the simulated sources (default: %(default)s)")
    p.add_argument("--npix", type=int, default=64, help="image side in pixels (default: %(default)s)")
    p.add_argument("--fov", type=float, default=160.0, help="field of view in microarcseconds (default: %(default)s)")
    p.add_argument("--total-flux", type=float, default=None, help="total flux in Jy (default: from the intra-site baselines)")
    p.add_argument("--systematic-noise", type=float, default=0.02, help="fractional systematic noise (default: %(default)s)")
    add_training_arguments(p)
    p.set_defaults(func=run_train_amortized)


def run_train_amortized(args: argparse.Namespace) -> int:
    from ppm_core.cli import amortized_config, run_training
    from ppm_core.priors import load_prior
    from ppm_core.priors.network import read_config

    from .amortized import train_on_coverage
    from .data import load_uvfits
    from .reconstruct import DEFAULT_PRIOR, check_grid, prior_pixel_size

    _check_grid_args(args)
    if args.observations < 1:
        raise ValueError(f"--observations must be >= 1; got {args.observations}")
    prior_path = args.prior or DEFAULT_PRIOR
    prior_pixel = prior_pixel_size(read_config(prior_path))
    check_grid(args.npix, args.fov, prior_pixel)
    config = amortized_config(args)
    prior = load_prior(prior_path)
    obs = load_uvfits(args.uvfits)
    return run_training(args, config, lambda callback: train_on_coverage(
        obs, prior, args.out, args.observations, args.images, args.npix, args.fov, args.total_flux, args.systematic_noise,
        config, resume=args.resume, callback=callback, seed=args.seed, device=args.device,
        description={"uvfits": str(args.uvfits), "prior_folder": str(prior_path)}))


def run_rml(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ppm_core.io import atomic_path

    from .data import UAS, closure_data, estimate_total_flux, load_uvfits, preprocess, quiet
    from .io import rml_image
    from .reconstruct import find_ring
    from .operators import ClosureOperator

    if not args.out.name.lower().endswith((".fits", ".fit", ".fts")):
        raise ValueError(f"--out must end in .fits; got {args.out.name}")
    _check_paths({"uvfits": args.uvfits}, {"--out": args.out, "--summary-json": args.summary_json})
    _check_grid_args(args)
    obs = load_uvfits(args.uvfits)
    flux = args.total_flux if args.total_flux is not None else estimate_total_flux(obs)
    logger.info("ehtim RML imaging of %s (this takes a few minutes)", args.uvfits)
    image = rml_image(obs, args.npix, args.fov, total_flux=flux, systematic_noise=args.systematic_noise,
                      prior_fwhm_uas=args.prior_fwhm)
    with atomic_path(args.out) as tmp:
        quiet(image.save_fits, str(tmp))
    logger.info("wrote %s", args.out)
    data = closure_data(preprocess(obs, systematic_noise=args.systematic_noise), args.npix, args.fov, total_flux=flux)
    array = image.imvec.reshape(image.ydim, image.xdim)
    x = torch.as_tensor(array)[None, None]
    operator = ClosureOperator(data, terms=("cphase", "logcamp"))
    counts = {"cphase": len(data.cphase), "logcamp": len(data.logcamp)}
    chisq = {dtype: float(operator.chisq(x, dtype)[0]) for dtype, count in counts.items() if count}
    ring = find_ring(array, image.psize / UAS)
    ring = ring.as_dict() if ring is not None else None
    logger.info("reduced chi2: %s", ", ".join(f"{k} {v:.2f}" for k, v in chisq.items()))
    if args.summary_json is not None:
        from .reconstruct import peak_memory_mb

        _write_json(args.summary_json, {"method": "ehtim rml", "reduced_chisq": chisq, "ring": ring, "total_flux_jy": float(np.sum(array)),
                                        "npix": args.npix, "fov_uas": args.fov, "peak_memory_mb": peak_memory_mb()})
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    from ppm_core.io import atomic_path

    from .data import load_uvfits, quiet
    from .io import load_model_image, simulate_observation

    if args.out.suffix.lower() not in (".uvfits", ".fits", ".uvf"):
        raise ValueError(f"--out must end in .uvfits; got {args.out.name}")
    _check_paths({"model": args.model, "--like": args.like}, {"--out": args.out})
    if not 0 <= args.gain_error < 1:
        raise ValueError(f"--gain-error is a fraction in [0, 1); got {args.gain_error:g}")
    model = load_model_image(args.model)
    if args.total_flux is not None:
        if not args.total_flux > 0:
            raise ValueError(f"--total-flux must be positive (Jy); got {args.total_flux:g}")
        model.imvec = model.imvec * (args.total_flux / model.total_flux())
    like = load_uvfits(args.like)
    simulated = simulate_observation(model, like, gain_error=args.gain_error, phase_error=args.phase_error, seed=args.seed,
                                     add_noise=not args.no_noise)
    with atomic_path(args.out) as tmp:
        quiet(simulated.save_uvfits, str(tmp))
    logger.info("wrote %s: %d visibilities of %s (total flux %.3g Jy)", args.out, len(simulated.data), args.model.name,
                model.total_flux())
    return 0
