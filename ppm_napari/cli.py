"""``ppm micro``: super-resolution of widefield TIFFs from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

logger = logging.getLogger("ppm.micro")

DEFAULT_PRIOR = Path(__file__).parent / "models" / "filaments-sim"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``micro reconstruct`` to the ``ppm`` command."""
    from .superres import METHODS

    micro = subparsers.add_parser("micro", help="microscopy: widefield -> SIM-like super-resolution")
    commands = micro.add_subparsers(dest="micro_command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "reconstruct",
        help="posterior samples, mean and std of the super-resolved image behind a widefield TIFF",
        description=(
            "Reconstruct a super-resolved image with posterior samples from a widefield TIFF (a 3-D stack, such as "
            "raw SIM frames, is averaged). Writes one OME-TIFF: channel 0 the posterior mean, 1 the per-pixel std, "
            "2.. the samples; the run parameters are in the OME Description as JSON."
        ),
    )
    p.add_argument("widefield", type=Path, help="widefield TIFF (2-D, or a stack of frames to average)")
    p.add_argument("--out", type=Path, required=True, help="output OME-TIFF (.ome.tif)")
    _add_optics_arguments(p)
    p.add_argument("--method", choices=METHODS, default="ppm", help="reconstruction method (default: %(default)s)")
    p.add_argument("--samples", type=int, default=8, help="posterior samples (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="iterations (default: the method's microscopy default)")
    p.add_argument("--prior", type=Path, default=None, help="prior folder (default: the shipped filament prior)")
    _add_noise_arguments(p)
    p.add_argument("--frames-averaged", type=int, default=None,
                   help="number of frames averaged into the image, which divides the given noise variance "
                        "(default: the stack length for stacks, else 1)")
    p.add_argument("--tile-size", type=int, default=None, help="tile side in camera pixels; bounds peak memory (default: whole image)")
    p.add_argument("--tile-overlap", type=int, default=None, help="tile overlap in camera pixels (default: max(16, PSF diameter))")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--truth", type=Path, default=None, help="ground-truth TIFF on the super-resolved grid, for --metrics-json")
    p.add_argument("--metrics-json", type=Path, default=None, help="write PSNR, SSIM, coverage and diversity against --truth")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--amortized", type=Path, default=None, metavar="MODEL",
                   help="draw the samples in one pass per tile with an amortized model (ppm train-amortized micro); the model's "
                        "PSF, scale, tile size, intensity map and noise model are used, so PSF, noise and --method options do not apply")
    p.add_argument("--each-frame", action="store_true",
                   help="with --amortized: reconstruct every frame of a stack and write a time series (axes TCYX) "
                        "instead of averaging the frames")
    p.set_defaults(func=run_reconstruct)


def _add_optics_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", type=int, default=None, help="super-resolution factor (default: 2; with --amortized, the model's)")
    p.add_argument("--pixel-size", type=float, default=None,
                   help="camera pixel size in nm; read from OME/ImageJ metadata when present")
    psf = p.add_argument_group("PSF (one of)")
    psf.add_argument("--na", type=float, help="detection numerical aperture (Airy model; needs --wavelength)")
    psf.add_argument("--wavelength", type=float, help="emission wavelength in nm (Airy model)")
    psf.add_argument("--psf", type=Path, help="measured PSF: a bead image TIFF")
    psf.add_argument("--psf-pixel-size", type=float, default=None, help="pixel size of --psf in nm, when not in its metadata")
    psf.add_argument("--otf", type=Path, help="radially averaged OTF file (*_OTF2d.mrc)")
    psf.add_argument("--gaussian-fwhm", type=float, help="Gaussian PSF with this FWHM in nm")


def _add_noise_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--noise", choices=["estimate", "gaussian", "poisson-gaussian"], default="estimate",
                   help="noise model: estimated from the image, or given by --noise-std / --gain --offset --read-noise (default: %(default)s)")
    p.add_argument("--noise-std", type=float, help="Gaussian noise std in ADU (--noise gaussian)")
    p.add_argument("--gain", type=float, help="camera gain in ADU per photon (--noise poisson-gaussian)")
    p.add_argument("--offset", type=float, default=0.0, help="camera offset in ADU (--noise poisson-gaussian)")
    p.add_argument("--read-noise", type=float, default=0.0, help="read noise std in ADU (--noise poisson-gaussian)")


def add_train_amortized(commands: argparse._SubParsersAction, add_training_arguments) -> None:
    """Add ``train-amortized micro``."""
    p = commands.add_parser(
        "micro",
        help="train on the tiles of a widefield stack (time-lapse or any frames with one PSF and camera)",
        description="Cut every frame of a widefield TIFF stack into overlapping tiles and train an amortized super-resolution "
                    "generator on them (no ground truth). `ppm micro reconstruct FRAMES.tif --amortized MODEL` then "
                    "reconstructs frames of that acquisition in one pass per tile.",
    )
    p.add_argument("frames", type=Path, help="widefield TIFF: a 2-D image or a stack of frames (each frame is used)")
    _add_optics_arguments(p)
    _add_noise_arguments(p)
    p.add_argument("--tile-size", type=int, default=32, help="tile side in camera pixels (default: %(default)s)")
    p.add_argument("--tile-overlap", type=int, default=16, help="overlap of the training tiles in camera pixels (default: %(default)s)")
    add_training_arguments(p)
    p.set_defaults(func=run_train_amortized)


def run_train_amortized(args: argparse.Namespace) -> int:
    from ppm_core.cli import amortized_config, run_training
    from ppm_core.priors import load_prior

    from .amortized import train_on_stack
    from .io import read_widefield, resolve_pixel_size

    args.scale = 2 if args.scale is None else args.scale
    if args.scale < 1:
        raise ValueError(f"--scale must be a positive integer; got {args.scale}")
    config = amortized_config(args)
    frames, _ = read_widefield(args.frames, frames="all")
    pixel_size = resolve_pixel_size(args.frames, args.pixel_size)
    fine_pixel = pixel_size / args.scale
    psf, psf_info = _psf_from_args(args, fine_pixel)
    noise = _noise_from_args(args, 1)
    prior_path = args.prior or DEFAULT_PRIOR
    prior = load_prior(prior_path, device=args.device)
    description = {"input": str(args.frames), "input_pixel_size_nm": pixel_size, "pixel_size_nm": fine_pixel, "psf_source": psf_info,
                   "prior_folder": str(prior_path)}
    return run_training(args, config, lambda callback: train_on_stack(
        frames, psf, prior, args.out, args.scale, args.tile_size, args.tile_overlap, noise, config, resume=args.resume,
        callback=callback, device=args.device, description=description))


def _psf_from_args(args: argparse.Namespace, fine_pixel: float):
    from ppm_core.io import read_image

    from . import psf as psf_models
    from .io import resolve_pixel_size

    given = [name for name, value in (("--na/--wavelength", args.na or args.wavelength), ("--psf", args.psf),
                                      ("--otf", args.otf), ("--gaussian-fwhm", args.gaussian_fwhm)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one PSF source: --na with --wavelength, --psf, --otf or --gaussian-fwhm; got {given or 'none'}")
    if given[0] == "--na/--wavelength":
        if args.na is None or args.wavelength is None:
            raise ValueError("the Airy PSF needs both --na and --wavelength")
        return psf_models.airy_psf(args.na, args.wavelength, fine_pixel), {"kind": "airy", "na": args.na, "wavelength_nm": args.wavelength}
    if args.psf is not None:
        psf_pixel = resolve_pixel_size(args.psf, args.psf_pixel_size, "--psf-pixel-size")
        image = read_image(args.psf)
        return psf_models.measured_psf(image, psf_pixel, fine_pixel), {"kind": "measured", "file": str(args.psf), "pixel_size_nm": psf_pixel}
    if args.otf is not None:
        return psf_models.psf_from_otf(args.otf, fine_pixel), {"kind": "otf", "file": str(args.otf)}
    if not args.gaussian_fwhm > 0:
        raise ValueError(f"--gaussian-fwhm must be a positive width in nm; got {args.gaussian_fwhm:g}")
    fwhm_px = args.gaussian_fwhm / fine_pixel
    return psf_models.gaussian_psf(fwhm_px), {"kind": "gaussian", "fwhm_nm": args.gaussian_fwhm}


def _noise_from_args(args: argparse.Namespace, frames: int):
    from ppm_core.operators import SignalDependentNoise

    if args.noise == "estimate":
        return None
    if args.noise == "gaussian":
        if args.noise_std is None or not args.noise_std > 0:
            raise ValueError(f"--noise gaussian needs a positive --noise-std (ADU); got {args.noise_std}")
        variance = args.noise_std**2 / frames
        return SignalDependentNoise(0.0, variance, variance)
    if args.gain is None or not args.gain > 0:
        raise ValueError(f"--noise poisson-gaussian needs a positive --gain (ADU per photon); got {args.gain}")
    if args.read_noise < 0:
        raise ValueError(f"--read-noise must be >= 0; got {args.read_noise}")
    slope = args.gain / frames
    intercept = (args.read_noise**2 - args.gain * args.offset) / frames
    floor = max(args.read_noise**2 / frames, 1e-3 * args.gain / frames)
    return SignalDependentNoise(slope, intercept, floor)


def _check_distinct_files(args: argparse.Namespace) -> None:
    """Reject runs whose outputs would overwrite an input or each other."""
    paths = {"--out": args.out, "--metrics-json": args.metrics_json, "widefield": args.widefield, "--truth": args.truth}
    seen: dict[Path, str] = {}
    for name, path in paths.items():
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved in seen:
            raise ValueError(f"{name} and {seen[resolved]} are the same file ({path}); the run would overwrite it")
        seen[resolved] = name


def run_reconstruct(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from ppm_core.cli import _check_output_file, _resolve_device
    from ppm_core.priors import load_prior

    from . import metrics
    from .io import read_widefield, resolve_pixel_size, write_result
    from .superres import DETERMINISTIC_METHODS, super_resolve

    # Everything that can be checked is checked before the long part starts.
    if not args.out.name.lower().endswith((".ome.tif", ".ome.tiff")):
        raise ValueError(f"--out must end in .ome.tif or .ome.tiff; got {args.out.name}")
    _check_output_file(args.out, "--out")
    _check_distinct_files(args)
    if args.metrics_json is not None:
        if args.truth is None:
            raise ValueError("--metrics-json needs --truth (a ground-truth TIFF)")
        _check_output_file(args.metrics_json, "--metrics-json")
    if args.scale is not None and args.scale < 1:
        raise ValueError(f"--scale must be a positive integer; got {args.scale}")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1; got {args.samples}")
    if args.method not in DETERMINISTIC_METHODS and args.samples < 2:
        logger.warning("--samples 1 gives no per-pixel uncertainty (std is zero)")
    if args.each_frame and args.amortized is None:
        raise ValueError("--each-frame needs --amortized MODEL; particle methods reconstruct one (averaged) image")
    if args.amortized is not None:
        return _run_amortized(args)
    args.scale = 2 if args.scale is None else args.scale
    import tifffile

    widefield, n_frames = read_widefield(args.widefield)
    pixel_size = resolve_pixel_size(args.widefield, args.pixel_size)
    fine_pixel = pixel_size / args.scale
    psf, psf_info = _psf_from_args(args, fine_pixel)
    frames = n_frames if args.frames_averaged is None else args.frames_averaged
    if frames < 1:
        raise ValueError(f"--frames-averaged must be >= 1; got {frames}")
    noise = _noise_from_args(args, frames)
    truth = None
    if args.truth is not None:
        if not args.truth.is_file():
            raise FileNotFoundError(f"--truth file not found: {args.truth}")
        try:
            truth = np.squeeze(tifffile.imread(args.truth)).astype(np.float64)
        except Exception as exc:  # tifffile raises several types for corrupt files
            raise ValueError(f"cannot read --truth {args.truth} as TIFF: {exc}") from exc
        expected = (widefield.shape[0] * args.scale, widefield.shape[1] * args.scale)
        if truth.shape != expected:
            raise ValueError(f"--truth has shape {truth.shape}; expected {expected} (the widefield's shape x --scale {args.scale})")
        if not np.all(np.isfinite(truth)) or truth.max() <= truth.min():
            raise ValueError(f"--truth {args.truth} is constant or contains NaN or infinite pixels")

    device = _resolve_device(args.device)
    prior = None
    prior_path = None
    if args.method not in DETERMINISTIC_METHODS:
        prior_path = args.prior or DEFAULT_PRIOR
        prior = load_prior(prior_path, device=device)

    with tqdm(desc=f"micro {args.method}", unit="step") as bar:

        def report(state: dict) -> None:
            if bar.total is None:
                bar.total = state["steps"] * state["tiles"]
            bar.update(1)
            losses = state.get("losses", {})
            if "data term" in losses:
                bar.set_postfix(tile=f"{state['tile']}/{state['tiles']}", data=f"{losses['data term']:.3g}")

        result = super_resolve(widefield, psf, prior, scale=args.scale, method=args.method, n_samples=args.samples, steps=args.steps,
                               noise=noise, tile_size=args.tile_size, tile_overlap=args.tile_overlap, seed=args.seed, callback=report)
    from ppm_core import __version__

    parameters = result.parameters | {
        "input": str(args.widefield),
        "input_pixel_size_nm": pixel_size,
        "pixel_size_nm": fine_pixel,
        "frames_averaged": frames,
        "psf": psf_info,
        "prior": str(prior_path) if prior_path else None,
        "device": device,
        "seconds": round(result.seconds, 2),
        "peak_memory_mb": round(result.peak_memory_mb, 1),
        "software": f"ppm-imaging {__version__}",
    }
    write_result(args.out, result.mean, result.std, result.samples, fine_pixel, parameters)
    logger.info("wrote %s (%d samples, %.1f s, peak memory %.0f MB)", args.out, result.samples.shape[0], result.seconds, result.peak_memory_mb)
    if truth is not None:
        scores = metrics.evaluate(result.samples, result.mean, truth)
        scores = {k: (None if v is None or not math.isfinite(v) else round(v, 5)) for k, v in scores.items()}
        scores |= {"method": args.method, "truth": str(args.truth), "protocols": "see ppm_napari.metrics"}
        logger.info("metrics: %s", scores)
        if args.metrics_json is not None:
            from ppm_core.io import atomic_path

            with atomic_path(args.metrics_json) as tmp:
                tmp.write_text(json.dumps(scores, indent=2) + "\n")
    return 0


def _run_amortized(args: argparse.Namespace) -> int:
    import numpy as np

    from ppm_core import __version__
    from ppm_core.cli import _resolve_device

    from .amortized import apply_to_frames, load_model
    from .io import read_widefield, resolve_pixel_size, write_result

    options = {"--na": args.na, "--wavelength": args.wavelength, "--psf": args.psf, "--psf-pixel-size": args.psf_pixel_size,
             "--otf": args.otf, "--gaussian-fwhm": args.gaussian_fwhm, "--steps": args.steps, "--prior": args.prior,
             "--tile-size": args.tile_size, "--tile-overlap": args.tile_overlap, "--noise-std": args.noise_std, "--gain": args.gain,
             "--frames-averaged": args.frames_averaged}
    ignored = [name for name, value in options.items() if value is not None]
    ignored += [name for name, value, default in (("--method", args.method, "ppm"), ("--noise", args.noise, "estimate"),
                                                  ("--offset", args.offset, 0.0), ("--read-noise", args.read_noise, 0.0)) if value != default]
    if ignored:
        logger.warning("with --amortized the model's own settings are used; ignoring %s", ", ".join(ignored))
    if args.truth is not None:
        raise ValueError("--truth/--metrics-json are not available with --amortized; score the written mean with ppm_napari.metrics")
    model = load_model(args.amortized, device=_resolve_device(args.device))
    info = model.config["description"]
    if args.scale is not None and args.scale != int(info["scale"]):
        raise ValueError(f"--scale {args.scale} differs from the model's scale ({info['scale']}); leave --scale out to use the model's")
    args.scale = int(info["scale"])
    frames, n_frames = read_widefield(args.widefield, frames="all" if args.each_frame else "mean")
    frames = frames if args.each_frame else frames[None]
    if n_frames > 1 and not args.each_frame:
        logger.warning("the %d frames are averaged, but the model's noise model is that of one frame; the samples are then wider "
                       "than the posterior of the mean. Use --each-frame for a model trained on single frames", n_frames)
    trained_pixel = info.get("input_pixel_size_nm")
    try:
        pixel_size = resolve_pixel_size(args.widefield, args.pixel_size)
    except ValueError:
        if args.pixel_size is not None or not trained_pixel:
            raise
        pixel_size = float(trained_pixel)
        logger.info("the image has no pixel size in its metadata; using the model's %g nm", pixel_size)
    if trained_pixel and abs(pixel_size / trained_pixel - 1) > 0.01:
        raise ValueError(f"the image's pixel size ({pixel_size:g} nm) differs from the one the model was trained on ({trained_pixel:g} nm)")
    from tqdm import tqdm

    with tqdm(desc="micro amortized", unit="frame", total=len(frames)) as bar:

        def report(state: dict) -> None:
            bar.update(1)

        results = apply_to_frames(model, frames, n_samples=args.samples, seed=args.seed, callback=report)
    seconds = sum(r.seconds for r in results)
    parameters = results[0].parameters | {
        "input": str(args.widefield),
        "frames": len(results) if args.each_frame else 1,
        "frames_averaged": 1 if args.each_frame else n_frames,
        "input_pixel_size_nm": pixel_size,
        "pixel_size_nm": pixel_size / args.scale,
        "model": str(args.amortized),
        "model_trained_steps": model.config.get("trained_steps"),
        "seconds": round(seconds, 3),
        "software": f"ppm-imaging {__version__}",
    }
    parameters.pop("frame", None)
    if args.each_frame:
        write_result(args.out, np.stack([r.mean for r in results]), np.stack([r.std for r in results]),
                     np.stack([r.samples for r in results]), pixel_size / args.scale, parameters)
    else:
        write_result(args.out, results[0].mean, results[0].std, results[0].samples, pixel_size / args.scale, parameters)
    logger.info("wrote %s (%d frame(s), %d samples each, %.2f s)", args.out, len(results), args.samples, seconds)
    return 0
