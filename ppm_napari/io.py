"""Microscopy files: widefield input with its pixel size, OME-TIFF output with the posterior.

Output layout (one OME-TIFF, one image series, axes ``CYX``, float32):

==========  =========================================================
channel     content
==========  =========================================================
0           posterior mean
1           posterior standard deviation (per pixel)
2 ...       posterior samples 1 ... N
==========  =========================================================

A time series (``ppm micro reconstruct --amortized --each-frame``) has axes ``TCYX`` with the
same channels for every frame. The OME channel names repeat this layout. ``PhysicalSizeX/Y`` is the super-resolved pixel size (input pixel
size / scale) in micrometres. The OME ``Description`` of the image holds the run's parameters
as JSON (method, options, PSF, noise model, scale, prior, software version), and a
``MapAnnotation`` repeats the main ones as key-value pairs for OMERO and Fiji.
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ppm_core.io import atomic_path

_LENGTH_UNITS_NM = {"nm": 1.0, "µm": 1e3, "um": 1e3, "micron": 1e3, "microns": 1e3, "mm": 1e6, "cm": 1e7, "m": 1e9, "\\u00B5m": 1e3}


def _open_tiff(path: Path):
    import tifffile

    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"image file {path} is empty (0 bytes)")
    try:
        return tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises several types for corrupt files
        raise ValueError(f"cannot read {path} as TIFF: {exc}") from exc


def read_pixel_size(path: str | os.PathLike) -> float | None:
    """Pixel size in nm from OME or ImageJ metadata of a TIFF, or ``None`` when it is absent.

    OME: ``Pixels/@PhysicalSizeX`` with its unit (default µm). ImageJ: the ``unit`` entry and the
    XResolution tag (pixels per unit). TIFF resolution tags alone (without a unit) are ignored,
    because most writers set them to 1 pixel per inch by default.
    """
    path = Path(path)
    with _open_tiff(path) as tif:
        if tif.is_ome and tif.ome_metadata:
            try:
                root = ET.fromstring(tif.ome_metadata)
            except ET.ParseError as exc:
                raise ValueError(f"{path}: OME-XML metadata is malformed: {exc}") from exc
            for element in root.iter():
                if element.tag.endswith("Pixels") and "PhysicalSizeX" in element.attrib:
                    unit = element.attrib.get("PhysicalSizeXUnit", "µm")
                    if unit not in _LENGTH_UNITS_NM:
                        raise ValueError(f"{path}: unsupported PhysicalSizeXUnit {unit!r}; expected one of nm, µm, mm")
                    size_x = float(element.attrib["PhysicalSizeX"]) * _LENGTH_UNITS_NM[unit]
                    if "PhysicalSizeY" in element.attrib:
                        unit_y = element.attrib.get("PhysicalSizeYUnit", "µm")
                        size_y = float(element.attrib["PhysicalSizeY"]) * _LENGTH_UNITS_NM.get(unit_y, float("nan"))
                        _check_square_pixels(path, size_x, size_y)
                    return _check_plausible(path, size_x)
        if tif.is_imagej and tif.imagej_metadata:
            unit = str(tif.imagej_metadata.get("unit", "")).strip()
            tag = tif.pages.first.tags.get("XResolution")
            if unit and tag is not None:
                numerator, denominator = tag.value
                if unit.lower() in _LENGTH_UNITS_NM and numerator > 0:
                    size_x = denominator / numerator * _LENGTH_UNITS_NM[unit.lower()]
                    tag_y = tif.pages.first.tags.get("YResolution")
                    if tag_y is not None and tag_y.value[0] > 0:
                        _check_square_pixels(path, size_x, tag_y.value[1] / tag_y.value[0] * _LENGTH_UNITS_NM[unit.lower()])
                    return _check_plausible(path, size_x)
    return None


def _check_square_pixels(path: Path, size_x: float, size_y: float) -> None:
    if not abs(size_x - size_y) <= 0.01 * size_x:
        raise ValueError(f"{path} has non-square pixels ({size_x:g} x {size_y:g} nm); resample it to square pixels first")


def _check_plausible(path: Path | str, size_nm: float, name: str = "pixel size") -> float:
    """Reject pixel sizes outside [1 nm, 100 um], which are almost always a unit mistake."""
    if not 1.0 <= size_nm <= 1e5:
        raise ValueError(f"the {name} of {path} is {size_nm:g} nm, outside 1 nm - 100 um; check that it is given in nm")
    return size_nm


def read_widefield(path: str | os.PathLike, frames: str = "mean") -> tuple[np.ndarray, int]:
    """Read a widefield image as a 2-D float64 array; return it and the number of frames averaged.

    A 3-D stack (for example the 9 raw frames of a SIM acquisition) is averaged over its first
    axis when ``frames="mean"``; ``frames="error"`` refuses stacks; ``frames="all"`` keeps every
    frame and returns a ``(T, H, W)`` array (``(1, H, W)`` for a 2-D image).
    """
    path = Path(path)
    with _open_tiff(path) as tif:
        try:
            data = tif.asarray()
        except Exception as exc:
            raise ValueError(f"cannot decode the pixels of {path}: {exc}") from exc
        axes = tif.series[0].axes if tif.series else ""
        photometric = tif.pages.first.photometric if len(tif.pages) else None
    if "S" in axes or (photometric is not None and photometric.name in ("RGB", "PALETTE", "YCBCR")):
        raise ValueError(f"{path} is a colour (RGB) image; a single-channel widefield image is expected")
    if "C" in axes and data.shape[axes.index("C")] > 1:
        raise ValueError(f"{path} has {data.shape[axes.index('C')]} channels (axes {axes}); save the widefield channel on its own")
    data = np.squeeze(np.asarray(data))
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise ValueError(f"{path} has pixels of type {data.dtype}; expected integer or real values")
    n_frames = data.shape[0] if data.ndim == 3 else 1
    if frames == "all" and data.ndim in (2, 3) and data.size:
        data = data.astype(np.float64).reshape(-1, *data.shape[-2:])
        if not np.all(np.isfinite(data)):
            raise ValueError(f"{path} contains NaN or infinite pixels")
        return data, n_frames
    if data.ndim == 3:
        if frames != "mean":
            raise ValueError(f"{path} contains a stack of shape {data.shape}; a single 2-D widefield image is expected")
        data = data.astype(np.float64).mean(axis=0)
    if data.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D image or a 3-D stack of frames; got shape {data.shape}")
    if data.size == 0:
        raise ValueError(f"{path} contains an empty image")
    data = data.astype(np.float64)
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{path} contains NaN or infinite pixels")
    return data, n_frames


def resolve_pixel_size(path: str | os.PathLike, option: float | None, option_name: str = "--pixel-size") -> float:
    """Pixel size in nm: from the file's metadata, else from the option, else an error.

    When both are present and differ by more than 1%, the mismatch is an error too.
    """
    from_file = read_pixel_size(path)
    if option is not None and (not math.isfinite(option) or not 1.0 <= option <= 1e5):
        raise ValueError(f"{option_name} must be a pixel size in nm between 1 and 100000; got {option:g} (a value in um would be 1000x smaller)")
    if from_file is not None and option is not None and abs(from_file - option) > 0.01 * option:
        raise ValueError(
            f"{option_name} {option:g} nm does not match the pixel size {from_file:g} nm in {path}'s metadata; "
            "drop the option or fix the file"
        )
    if from_file is not None:
        return from_file
    if option is not None:
        return float(option)
    raise ValueError(f"the pixel size of {path} is not in its metadata; pass {option_name} (nm)")


def write_result(
    path: str | os.PathLike,
    mean: np.ndarray,
    std: np.ndarray,
    samples: np.ndarray,
    pixel_size_nm: float,
    parameters: dict,
) -> Path:
    """Write the posterior as one OME-TIFF (layout in the module docstring), atomically.

    ``mean`` and ``std`` are ``(H, W)`` with ``samples`` ``(n, H, W)``, or, for a time series,
    ``(T, H, W)`` with ``samples`` ``(T, n, H, W)``.
    """
    import tifffile

    path = Path(path)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    series = mean.ndim == 3
    if series:
        samples = np.asarray(samples, dtype=np.float32).reshape(mean.shape[0], -1, *mean.shape[1:])
        stack = np.concatenate([mean[:, None], std[:, None], samples], axis=1)
    else:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1, *mean.shape)
        stack = np.concatenate([mean[None], std[None], samples])
    n_samples = samples.shape[1] if series else samples.shape[0]
    names = ["posterior mean", "posterior std"] + [f"sample {i + 1}" for i in range(n_samples)]
    size_um = pixel_size_nm / 1e3
    annotation = {k: str(parameters[k]) for k in ("method", "scale", "n_samples", "psf") if k in parameters}
    metadata = {
        "axes": "TCYX" if series else "CYX",
        "Name": parameters.get("name", path.stem),
        "PhysicalSizeX": size_um,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": size_um,
        "PhysicalSizeYUnit": "µm",
        "Channel": {"Name": names},
        "Description": json.dumps(parameters, default=_json_default),
        "MapAnnotation": {"Namespace": "ppm-imaging/run", **annotation},
    }
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, stack, ome=True, photometric="minisblack", metadata=metadata,
                         resolution=(1e4 / size_um, 1e4 / size_um), resolutionunit="CENTIMETER")
    return path


def read_result(path: str | os.PathLike) -> dict:
    """Read an OME-TIFF written by :func:`write_result`.

    Returns a dict with ``mean``, ``std``, ``samples`` (arrays), ``pixel_size_nm``,
    ``channel_names`` and ``parameters`` (the JSON run parameters).
    """
    path = Path(path)
    with _open_tiff(path) as tif:
        if not tif.is_ome:
            raise ValueError(f"{path} is not an OME-TIFF")
        stack = tif.asarray()
        root = ET.fromstring(tif.ome_metadata)
    names = [e.attrib.get("Name", "") for e in root.iter() if e.tag.endswith("}Channel")]
    if stack.ndim not in (3, 4) or stack.shape[-3] < 3 or names[:2] != ["posterior mean", "posterior std"]:
        raise ValueError(f"{path} is not a PPM result: expected channels 'posterior mean', 'posterior std' and samples; "
                         f"got shape {stack.shape} and channels {names[:3]}")
    description = next((e.text for e in root.iter() if e.tag.endswith("}Description") and e.text), None)
    try:
        parameters = json.loads(description) if description else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: the Description is not this tool's JSON run parameters: {exc}") from exc
    # A time series (axes TCYX) keeps its time axis first in every array.
    return {
        "mean": stack[..., 0, :, :],
        "std": stack[..., 1, :, :],
        "samples": stack[..., 2:, :, :],
        "pixel_size_nm": read_pixel_size(path),
        "channel_names": names,
        "parameters": parameters,
    }


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
