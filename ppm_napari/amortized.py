"""Amortized super-resolution of widefield stacks: train once on the stack, then one pass per frame.

:func:`train_on_stack` cuts the frames of a widefield stack (a time-lapse, or any set of images
taken with one PSF, pixel size and camera) into overlapping tiles and trains an amortized
generator on them with the PPM loss (:func:`ppm_core.training.amortized.train_amortized`). No
ground truth is used. :func:`apply_to_frames` then draws posterior samples of every frame
tile by tile, one generator pass per tile, and blends the tiles as :func:`super_resolve` does.

A model is tied to what it was trained on. Its config stores the PSF, the scale, the tile size,
the intensity map into the prior's space and the noise model, and they are reused for every
frame it is applied to. Frames from another microscope or with other camera settings need a
model trained on them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ppm_core.inference.amortized import AmortizedModel, load_amortized
from ppm_core.inference.api import _is_int
from ppm_core.operators import SignalDependentNoise
from ppm_core.priors.base import Prior
from ppm_core.training.amortized import AmortizedConfig, train_amortized

from .noise import estimate_noise
from .operator import SuperResolution
from .superres import SuperResolutionResult, TileBlender, _check_image, peak_memory_mb, richardson_lucy, tile_starts

logger = logging.getLogger(__name__)

TASK = "microscopy super-resolution"


def _check_stack(frames: np.ndarray) -> np.ndarray:
    stack = np.asarray(frames, dtype=np.float64)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3 or stack.shape[0] < 1:
        raise ValueError(f"frames must be a 2-D image or a (T, H, W) stack; got shape {np.shape(frames)}")
    for index, frame in enumerate(stack):
        try:
            _check_image(frame)
        except ValueError as exc:
            raise ValueError(f"frame {index}: {exc}") from None
    return stack


def stack_tiles(stack: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    """Cut every frame into ``tile x tile`` tiles that overlap by at least ``overlap``; return ``(N, tile, tile)``."""
    _, height, width = stack.shape
    if tile > min(height, width):
        raise ValueError(f"tile_size ({tile}) must not exceed the frames' smaller side ({min(height, width)} camera pixels)")
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    return np.stack([frame[r : r + tile, c : c + tile] for frame in stack for r in rows for c in cols])


def train_on_stack(
    frames: np.ndarray,
    psf: np.ndarray,
    prior: Prior,
    out_dir,
    scale: int = 2,
    tile_size: int = 32,
    tile_overlap: int = 16,
    noise: SignalDependentNoise | None = None,
    config: AmortizedConfig | None = None,
    resume: bool = False,
    callback: Callable[[dict], bool | None] | None = None,
    rl_iterations: int = 30,
    device: str = "cpu",
    description: dict[str, Any] | None = None,
) -> AmortizedModel:
    """Train an amortized super-resolution model on the tiles of a widefield stack.

    Parameters
    ----------
    frames : (T, H, W) or (H, W) array
        Widefield frames in camera units (ADU), all with the same optics and camera.
    psf : (h, w) array
        PSF on the fine grid (see :mod:`ppm_napari.psf`).
    prior : Prior
        Diffusion prior of fine images, single channel.
    out_dir : path
        Model folder to write.
    scale, tile_size, tile_overlap
        Super-resolution factor, and the side and overlap of the training tiles in camera pixels.
        The model is applied with the same tile size.
    noise : SignalDependentNoise, optional
        Noise of one frame in its units; estimated from the first frame when omitted.
    config : AmortizedConfig
        Training settings (steps, batch size, auxiliary form, objective).
    """
    stack = _check_stack(frames)
    psf = np.asarray(psf, dtype=np.float64)
    if not _is_int(tile_size) or tile_size < 16:
        raise ValueError(f"tile_size must be an integer of at least 16 camera pixels; got {tile_size!r}")
    if not _is_int(tile_overlap) or not 0 <= tile_overlap < tile_size:
        raise ValueError(f"tile_overlap must be an integer in [0, tile_size); got {tile_overlap!r}")
    SuperResolution(psf, scale, (tile_size, tile_size))  # raises ValueError for a bad psf or scale
    channels = getattr(prior, "in_channels", 1)
    if channels != 1:
        raise ValueError(f"the prior models images with {channels} channels; a widefield image has 1. Use a single-channel prior")
    if noise is None:
        noise = estimate_noise(stack[0])
    # One affine map into the prior's space for the whole stack, from a Richardson-Lucy estimate of the mean frame.
    reference = torch.as_tensor(richardson_lucy(stack.mean(0), psf, scale, rl_iterations))
    _, norm = prior.normalize(reference) if hasattr(prior, "normalize") else (None, {"offset": 0.0, "scale": 1.0})
    offset, unit = float(norm["offset"]), float(norm["scale"])
    tiles = (stack_tiles(stack, tile_size, tile_overlap) - offset) / unit
    measurements = torch.as_tensor(tiles, dtype=torch.float32)[:, None]
    operator = SuperResolution(psf, scale, (tile_size, tile_size), noise=noise.rescaled(offset, unit))
    info = {
        "task": TASK,
        "scale": scale,
        "tile_size": tile_size,
        "tile_overlap": tile_overlap,
        "frames": int(stack.shape[0]),
        "frame_shape": list(stack.shape[1:]),
        "tiles": int(measurements.shape[0]),
        "psf": psf.tolist(),
        "psf_sha256": hashlib.sha256(np.ascontiguousarray(psf).tobytes()).hexdigest(),
        "normalization": {"offset": offset, "scale": unit},
        "noise": {"model": "signal-dependent Gaussian", "slope": noise.slope, "intercept": noise.intercept, "min_variance": noise.min_variance},
    } | dict(description or {})
    logger.info("training on %d tiles of %dx%d camera pixels from %d frame(s)", len(tiles), tile_size, tile_size, stack.shape[0])
    return train_amortized(measurements, operator, prior, out_dir, config, resume=resume, device=device, callback=callback, description=info)


def model_operator(config: dict[str, Any]) -> SuperResolution:
    """Rebuild the forward model of a microscopy amortized model's tiles from its config."""
    info = config.get("description", {})
    if info.get("task") != TASK:
        raise ValueError(f"the amortized model was trained for {info.get('task', 'another task')!r}, not {TASK!r}")
    try:
        noise = SignalDependentNoise(**{k: info["noise"][k] for k in ("slope", "intercept", "min_variance")})
        normalization = info["normalization"]
        tile = int(info["tile_size"])
        psf = np.asarray(info["psf"], dtype=np.float64)
        scale = int(info["scale"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the amortized model's config lacks a valid description entry ({exc!r})") from exc
    if hashlib.sha256(np.ascontiguousarray(psf).tobytes()).hexdigest() != info.get("psf_sha256"):
        raise ValueError("the amortized model's stored PSF does not match its psf_sha256; the config was edited or is corrupt")
    if not normalization.get("scale"):
        raise ValueError(f"the amortized model's intensity map has scale {normalization.get('scale')!r}; the config is corrupt")
    return SuperResolution(psf, scale, (tile, tile), noise=noise.rescaled(normalization["offset"], normalization["scale"]))


def load_model(directory, device: str = "cpu") -> AmortizedModel:
    """Load a microscopy amortized model with the operator stored in its config."""
    from ppm_core.inference.amortized import read_amortized_config

    return load_amortized(directory, model_operator(read_amortized_config(directory)), device=device)


def apply_to_frames(
    model: AmortizedModel,
    frames: np.ndarray,
    n_samples: int = 8,
    seed: int = 0,
    callback: Callable[[dict], bool | None] | None = None,
) -> list[SuperResolutionResult]:
    """Draw posterior samples of every frame, one generator pass per tile.

    ``frames`` is ``(T, H, W)`` or ``(H, W)`` in the units the model was trained on; each result
    has ``(n_samples, H * scale, W * scale)`` samples in those units. All tiles of a frame go
    through the generator together. ``callback`` gets ``{"frame", "frames"}`` after each frame;
    returning ``True`` cancels with :class:`~ppm_core.inference.ReconstructionCancelled`.
    """
    from ppm_core.inference.common import ReconstructionCancelled

    if not _is_int(n_samples) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer; got {n_samples!r}")
    stack = _check_stack(frames)
    info = model.config["description"]
    # Tiles overlap by a quarter of their side: enough for the blending ramps, and each pixel is drawn at most 4 times.
    scale, tile = int(info["scale"]), int(info["tile_size"])
    overlap = max(4, tile // 4)
    offset, unit = info["normalization"]["offset"], info["normalization"]["scale"]
    if tile > min(stack.shape[1:]):
        raise ValueError(f"the model works on tiles of {tile}x{tile} camera pixels; frames of shape {stack.shape[1:]} are smaller")
    results = []
    for t, frame in enumerate(stack):
        start = time.perf_counter()
        blender = TileBlender(frame.shape, tile, overlap, scale, n_samples)
        y_all = (frame - offset) / unit
        ys = torch.stack([torch.as_tensor(y_all[top:bottom, left:right]) for top, left, bottom, right in blender.tiles])[:, None]
        samples = model.sample_many(ys, n_samples, seed=seed + t)
        for index in range(len(blender.tiles)):
            blender.add(index, samples[index, :, 0].double().numpy() * unit + offset)
        samples, mean, std = blender.result()
        if not np.isfinite(mean).all():
            raise FloatingPointError(f"frame {t}: the amortized model returned NaN or infinite values")
        parameters = {"method": "ppm-amortized", "scale": scale, "tile_size": tile, "tile_overlap": overlap, "n_samples": n_samples,
                      "seed": seed, "frame": t, "tiles": len(blender.tiles), "normalization": info["normalization"], "noise": info["noise"]}
        results.append(SuperResolutionResult(samples, mean, std, parameters, time.perf_counter() - start, peak_memory_mb()))
        if callback is not None and callback({"frame": t + 1, "frames": len(stack)}):
            raise ReconstructionCancelled(f"amortized reconstruction cancelled after frame {t + 1} of {len(stack)}")
    return results
