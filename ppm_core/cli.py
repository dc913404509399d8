"""The ``ppm`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("ppm")


def _parse_mults(text: str) -> list[int]:
    try:
        mults = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--channel-mults must be comma-separated integers such as 1,2,2; got {text!r}") from None
    if not mults or min(mults) < 1:
        raise argparse.ArgumentTypeError(f"--channel-mults must be positive integers; got {text!r}")
    return mults


def _resolve_device(requested: str | None) -> str:
    """Return the requested torch device, or cuda (this process's local rank) when available, else cpu."""
    import torch

    if requested is None:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"--device must be a torch device such as cpu or cuda:0; got {requested!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested} requested but this torch build or machine has no CUDA device; use --device cpu")
    return requested


def _check_output_file(path: Path, option: str) -> None:
    """Raise before any work starts if ``path`` cannot be written as a file."""
    if path.is_dir():
        raise ValueError(f"{option} must be a file path; {path} is a folder")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"{option} {path} cannot be written: {parent} is not a writable folder")


def _check_output_folder(path: Path, option: str) -> None:
    """Raise before any work starts if ``path`` cannot be used as an output folder."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} must be a folder; {path} is a file")
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ValueError(f"{option} {path} cannot be created: {existing} is not a writable folder")


def _add_train_prior(subparsers: argparse._SubParsersAction) -> None:
    from .training.data import SYNTHETIC_GENERATORS

    p = subparsers.add_parser(
        "train-prior",
        help="train a diffusion prior on a folder of images or a synthetic generator",
        description="Train a diffusion prior by denoising score matching. Runs under "
        "`torchrun --nproc_per_node=K` for data-parallel training.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="folder of TIFF/FITS/PNG training images (searched recursively)")
    source.add_argument("--synthetic", choices=sorted(SYNTHETIC_GENERATORS), help="name of a synthetic image generator")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (config.json, model.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue from the training state in --out")
    p.add_argument("--steps", type=int, default=20000, help="total optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step over all processes (default: %(default)s)")
    p.add_argument("--crop-size", type=int, default=64, help="side of square training crops in pixels (default: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--ema-halflife", type=float, default=500.0, help="EMA half-life in steps (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=50, help="steps between loss log lines (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--base-channels", type=int, default=32, help="U-Net channels at full resolution (default: %(default)s)")
    p.add_argument("--channel-mults", type=_parse_mults, default=[1, 2, 2], help="channel multiplier per resolution (default: 1,2,2)")
    p.add_argument("--blocks-per-level", type=int, default=2, help="residual blocks per resolution (default: %(default)s)")
    p.add_argument("--embedding-dim", type=int, default=128, help="width of the noise-level embedding (default: %(default)s)")
    p.add_argument(
        "--patch-size",
        type=int,
        default=1,
        help="pixels per side folded into channels before the U-Net; 4 makes large images about 16x cheaper (default: %(default)s)",
    )
    p.add_argument(
        "--normalization",
        choices=["percentile", "none"],
        default="percentile",
        help="intensity normalization of folder images: per-image percentiles to [-1, 1], or none (default: %(default)s)",
    )
    p.add_argument("--percentiles", type=float, nargs=2, default=[0.1, 99.9], metavar=("LOW", "HIGH"), help="percentiles mapped to -1 and 1 (default: 0.1 99.9)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=_run_train_prior)


def _run_train_prior(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .priors.unet import UNetConfig
    from .training import FolderSource, SyntheticSource, TrainConfig, train_prior

    if args.data is not None:
        if not 0 <= args.percentiles[0] < args.percentiles[1] <= 100:
            raise ValueError(f"--percentiles must satisfy 0 <= LOW < HIGH <= 100; got {args.percentiles}")
        normalization = {"method": args.normalization}
        if args.normalization == "percentile":
            normalization |= {"low": args.percentiles[0], "high": args.percentiles[1]}
        source = FolderSource(args.data, normalization)
    else:
        source = SyntheticSource(args.synthetic)
    unet_config = UNetConfig(
        in_channels=source.channels,
        base_channels=args.base_channels,
        channel_mults=args.channel_mults,
        blocks_per_level=args.blocks_per_level,
        embedding_dim=args.embedding_dim,
        patch_size=args.patch_size,
    )
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        crop_size=args.crop_size,
        lr=args.lr,
        ema_halflife=args.ema_halflife,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        seed=args.seed,
    )
    _check_output_folder(args.out, "--out")
    if not args.resume and (args.out / "config.json").exists():
        raise ValueError(f"--out {args.out} already contains a prior; pass --resume to continue training it, or choose another folder")
    device = _resolve_device(args.device)
    is_main = int(os.environ.get("RANK", "0")) == 0
    with tqdm(total=config.steps, desc="train-prior", disable=not is_main or None, unit="step") as bar:

        def report(state: dict) -> None:
            bar.n = state["step"]
            bar.set_postfix(loss=f"{state['loss']:.4f}", refresh=False)
            bar.update(0)

        # With --resume the checkpoint's architecture is used; pass the options only if they were changed.
        requested = unet_config if not args.resume or unet_config != UNetConfig(in_channels=source.channels) else None
        train_prior(source, args.out, requested, config, resume=args.resume, device=device, callback=report)
    if is_main:
        logger.info("prior written to %s", args.out)
    return 0


def _add_sample_prior(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sample-prior", help="draw unconditional samples from a prior into a PNG grid")
    p.add_argument("prior", type=Path, help="prior folder (config.json + model.safetensors)")
    p.add_argument("--n", type=int, default=16, help="number of samples (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="sample side in pixels (default: %(default)s)")
    p.add_argument("--steps", type=int, default=32, help="Heun sampler noise levels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, help="PNG file for the grid")
    p.add_argument("--tiff", type=Path, default=None, help="also write the samples as a float32 TIFF stack (prior's normalized space)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=_run_sample_prior)


def _run_sample_prior(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from .figures import image_grid
    from .io import atomic_path, save_png
    from .priors import load_prior
    from .sampling import edm_sampler

    for name, minimum in (("n", 1), ("size", 1), ("steps", 2)):
        if getattr(args, name) < minimum:
            raise ValueError(f"--{name} must be >= {minimum}; got {getattr(args, name)}")
    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file; got {args.out}")
    _check_output_file(args.out, "--out")
    if args.tiff is not None:
        _check_output_file(args.tiff, "--tiff")
    device = _resolve_device(args.device)
    prior = load_prior(args.prior, device=device)
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.n, prior.in_channels, args.size, args.size)
    with tqdm(total=args.steps, desc="sample-prior", unit="step") as bar:

        def report(state: dict) -> None:
            bar.update(1)

        samples = edm_sampler(prior, shape, steps=args.steps, generator=generator, device=device, callback=report)
    samples = samples.cpu()
    save_png(args.out, image_grid(samples, prior.normalization))
    logger.info("wrote %d samples to %s", args.n, args.out)
    if args.tiff is not None:
        import tifffile

        with atomic_path(args.tiff) as tmp:
            tifffile.imwrite(tmp, samples.numpy().astype("float32"))
        logger.info("wrote sample stack to %s", args.tiff)
    return 0


def _add_train_amortized(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-amortized",
        help="train an amortized generator on measurements (no ground truth) for one-pass posterior samples",
        description="Train a generator x = f(y, z), initialized from the prior's denoiser, with the PPM loss on a set of "
                    "measurements from one forward model. Runs under `torchrun --nproc_per_node=K` for data-parallel "
                    "training. The model folder then goes to `ppm micro reconstruct --amortized` or `ppm eht reconstruct --amortized`.",
    )
    commands = p.add_subparsers(dest="amortized_command", required=True, metavar="TASK")
    from ppm_napari.cli import add_train_amortized as add_micro

    add_micro(commands, add_training_arguments)
    from ppm_eht.cli import add_train_amortized as add_eht

    add_eht(commands, add_training_arguments)


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by every ``train-amortized`` task."""
    from .training.amortized import AmortizedConfig

    d = AmortizedConfig()
    p.add_argument("--out", type=Path, required=True, help="model folder to write (config.json, generator.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue from the training state in --out")
    p.add_argument("--prior", type=Path, default=None, help="prior folder (default: the task's shipped prior)")
    p.add_argument("--steps", type=int, default=d.steps, help="generator steps in total (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="measurements per step over all processes (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate of the generator (default: %(default)s)")
    p.add_argument("--aux-condition", choices=["measurement", "none"], default=d.aux_condition,
                   help="measurement: the auxiliary score sees y and the loss is the exact per-measurement KL; none: the "
                        "paper's marginal form, which gives too narrow samples (default: %(default)s)")
    p.add_argument("--objective", choices=["ppm", "ikl"], default=d.objective,
                   help="ppm: exact gradient; ikl: DAVI's integral-KL gradient, a biased baseline (default: %(default)s)")
    p.add_argument("--aux-steps", type=int, default=d.aux_steps, help="auxiliary steps per generator step (default: %(default)s)")
    p.add_argument("--aux-lr", type=float, default=d.aux_lr, help="learning rate of the auxiliary (default: %(default)s)")
    p.add_argument("--generator-sigma", type=float, default=d.generator_sigma,
                   help="noise level at which the generator applies the copied denoiser (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between loss log lines (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def amortized_config(args: argparse.Namespace):
    """Build and check the training settings and the output folder from the parsed options."""
    from .training.amortized import AmortizedConfig

    config = AmortizedConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, aux_condition=args.aux_condition,
                             objective=args.objective, aux_steps=args.aux_steps, aux_lr=args.aux_lr,
                             generator_sigma=args.generator_sigma, checkpoint_every=args.checkpoint_every,
                             log_every=args.log_every, seed=args.seed)
    config.validate(int(os.environ.get("WORLD_SIZE", "1")))
    _check_output_folder(args.out, "--out")
    if not args.resume and (args.out / "config.json").exists():
        raise ValueError(f"--out {args.out} already contains a model; pass --resume to continue training it, or choose another folder")
    args.device = _resolve_device(args.device)
    return config


def run_training(args: argparse.Namespace, config, train) -> int:
    """Run ``train(callback)`` with a tqdm bar on rank 0."""
    from tqdm import tqdm

    is_main = int(os.environ.get("RANK", "0")) == 0
    with tqdm(total=config.steps, desc="train-amortized", disable=not is_main or None, unit="step") as bar:

        def report(state: dict) -> None:
            bar.n = state["step"]
            bar.set_postfix(loss=f"{state['loss']:.4g}", data=f"{state['data term']:.4g}", refresh=False)
            bar.update(0)

        train(report)
    if is_main:
        logger.info("amortized model written to %s", args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppm", description="Bayesian image reconstruction with diffusion priors (Principled Posterior Matching).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_prior(subparsers)
    _add_sample_prior(subparsers)
    _add_train_amortized(subparsers)
    from ppm_napari.cli import add_parser as add_micro_parser

    add_micro_parser(subparsers)
    from ppm_eht.cli import add_parser as add_eht_parser

    add_eht_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.INFO
    if args.verbose:
        level = logging.DEBUG
    elif args.quiet:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            return args.func(args)
    except (ValueError, TypeError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    except FloatingPointError as exc:
        logger.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
