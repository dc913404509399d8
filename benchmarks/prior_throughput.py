"""Measure training and denoising throughput of the default network prior; print a Markdown table.

Run as ``python benchmarks/prior_throughput.py > docs/prior_throughput.md``; progress goes to
stderr. Each number is the median over timed repetitions after one warm-up repetition. A
measurement repeats until it has used ``--budget`` seconds, with at least ``--min-repeats`` and at
most ``--max-repeats`` timed repetitions. With the default settings a run took 162 s on an
idle 2-core AMD EPYC (torch 2.13), most of it in the four 256x256 training steps.

NOTE: on CPU with glibc malloc, large batches spend most of their time in page faults because
freed activations go back to the kernel. On the machine above, 8x256x256 denoising took 4.1 s
per call by default and 1.3 s with ``MALLOC_MMAP_THRESHOLD_=4294967296``, so the 256x256 rows
measure the allocator as much as the network.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ppm_core.priors import DiffusionPrior, UNetConfig
from ppm_core.training import SyntheticSource, TrainConfig, train_prior

logger = logging.getLogger("prior_throughput")

TRAIN_BATCH = 16
DENOISER_BATCHES = (8, 1)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_name() -> str:
    """Return the CPU model from /proc/cpuinfo, or what ``platform`` reports elsewhere."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({_cpu_name()})"


def time_training_steps(size: int, device: torch.device, args: argparse.Namespace) -> list[float]:
    """Return the durations in seconds of timed :func:`train_prior` steps on ``size``-pixel crops.

    A step is everything the training loop does: drawing synthetic crops, the EDM loss, the
    backward pass, the Adam update and the EMA update. The first step is the warm-up.
    """
    durations: list[float] = []
    last = [0.0]

    def on_step(state: dict) -> bool:
        _synchronize(device)
        now = time.perf_counter()
        if state["step"] > 1:
            durations.append(now - last[0])
        last[0] = now
        enough = len(durations) >= args.min_repeats and sum(durations) >= args.budget
        return enough or len(durations) >= args.max_repeats

    config = TrainConfig(steps=args.max_repeats + 1, batch_size=TRAIN_BATCH, crop_size=size, checkpoint_every=10**9, log_every=10**9)
    with tempfile.TemporaryDirectory() as out_dir:
        train_prior(SyntheticSource("blobs"), out_dir, UNetConfig(), config, device=device, callback=on_step)
    return durations


@torch.inference_mode()
def time_denoiser(prior: DiffusionPrior, batch: int, size: int, device: torch.device, args: argparse.Namespace) -> list[float]:
    """Return the durations in seconds of timed denoiser calls on a ``(batch, 1, size, size)`` input."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, generator=generator).to(device)
    sigma = torch.full((batch,), 0.5, device=device)

    # Warm-up call, then timed calls until the budget is used.
    prior.denoiser(x, sigma)
    _synchronize(device)
    durations: list[float] = []
    while len(durations) < args.max_repeats and (len(durations) < args.min_repeats or sum(durations) < args.budget):
        start = time.perf_counter()
        prior.denoiser(x, sigma)
        _synchronize(device)
        durations.append(time.perf_counter() - start)
    return durations


def _rate(count: int, durations: list[float]) -> str:
    """Format ``count / median(durations)`` with three significant digits and the repetition count."""
    return f"{count / statistics.median(durations):.3g} (n={len(durations)})"


def benchmark_device(device: torch.device, args: argparse.Namespace) -> list[str]:
    """Return the Markdown table rows of one device."""
    prior = DiffusionPrior(UNetConfig()).to(device).eval()
    rows = []
    for size in args.sizes:
        logger.info("%s %dx%d: training steps (batch %d)", device, size, size, TRAIN_BATCH)
        cells = [_rate(1, time_training_steps(size, device, args))]
        for batch in DENOISER_BATCHES:
            logger.info("%s %dx%d: denoiser (batch %d)", device, size, size, batch)
            cells.append(_rate(batch, time_denoiser(prior, batch, size, device, args)))
        rows.append(f"| {device.type} | {size}x{size} | " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="image sides in pixels (default: 64 256)")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timed repetitions per measurement (default: %(default)s)")
    parser.add_argument("--min-repeats", type=int, default=3, help="fewest timed repetitions per measurement (default: %(default)s)")
    parser.add_argument("--max-repeats", type=int, default=10, help="most timed repetitions per measurement (default: %(default)s)")
    parser.add_argument("--cpu-only", action="store_true", help="skip CUDA even when it is available")
    args = parser.parse_args(argv)
    if not 1 <= args.min_repeats <= args.max_repeats:
        parser.error(f"need 1 <= --min-repeats <= --max-repeats; got {args.min_repeats} and {args.max_repeats}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    logging.getLogger("ppm_core").setLevel(logging.WARNING)

    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    n_parameters = sum(p.numel() for p in DiffusionPrior(UNetConfig()).parameters())

    # Other processes on the machine distort the numbers, so the load average goes into the record.
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    rows = [row for device in devices for row in benchmark_device(device, args)]
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()[0]

    print("# Prior throughput\n")
    print(
        f"torch {torch.__version__}; devices: {', '.join(_device_name(d) for d in devices)}; "
        f"{torch.get_num_threads()} CPU threads; default UNetConfig with {n_parameters:,} parameters\n"
    )
    print("| device | image size | training steps/s (batch 16) | denoiser images/s (batch 8) | denoiser images/s (batch 1) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(
        f"\nMedian of n timed repetitions after one warm-up. A training step is one `train_prior` "
        f"iteration (synthetic blob crops, EDM loss, backward, Adam, EMA); the denoiser runs without "
        f"gradients. Produced by `python benchmarks/prior_throughput.py` in {elapsed:.0f} s; "
        f"1-minute load average {load_before:.2f} before and {load_after:.2f} after."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
