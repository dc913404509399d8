"""napari reader: TIFF and OME-TIFF with the layer scale taken from the pixel size.

Scale is in micrometres per pixel, the unit napari's scale bar shows. A result written by this
plugin (``ppm_napari.io.write_result``) opens as its mean, std and samples layers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def get_reader(path):
    """Return a reader for one ``.tif``/``.tiff`` path, or ``None`` (napari then tries others)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not str(path).lower().endswith((".tif", ".tiff")):
        return None
    return read_tiff


def read_tiff(path) -> list[tuple]:
    """Layer data tuples for one TIFF; raises ``ValueError`` with the reason for a bad file."""
    import tifffile

    from .io import read_pixel_size, read_result

    path = Path(path if not isinstance(path, list) else path[0])
    pixel_nm = read_pixel_size(path)
    with tifffile.TiffFile(path) as tif:
        is_result = tif.is_ome and "posterior mean" in (tif.ome_metadata or "")
    if is_result:
        return result_layers(read_result(path), path.stem.removesuffix(".ome"))
    data = np.squeeze(tifffile.imread(path))
    if data.size == 0:
        raise ValueError(f"{path} contains an empty image")
    meta = {"name": path.stem, "metadata": {"pixel_size_nm": pixel_nm, "source_file": str(path)}}
    if pixel_nm is not None:
        meta["scale"] = (1.0,) * (data.ndim - 2) + (pixel_nm / 1e3, pixel_nm / 1e3)
    return [(data, meta, "image")]


def result_layers(result: dict, name: str, scale: tuple[float, float] | None = None, translate: tuple[float, float] = (0.0, 0.0)) -> list[tuple]:
    """Mean, std and samples layer tuples for a result dict (as returned by ``read_result``)."""
    if scale is None:
        pixel = result.get("pixel_size_nm")
        scale = (pixel / 1e3, pixel / 1e3) if pixel else (1.0, 1.0)
    parameters = result.get("parameters", {})
    # A time series has a leading time axis on every array (samples: time, sample, y, x).
    extra = np.ndim(result["mean"]) - 2
    common = {"scale": (1.0,) * extra + tuple(scale), "translate": (0.0,) * extra + tuple(translate)}
    std = np.asarray(result["std"])
    high = float(np.percentile(std, 99.5)) if std.size and np.any(std > 0) else 1.0
    return [
        (result["mean"], common | {"name": f"{name} mean", "metadata": {"ppm_role": "mean", "ppm_source": name, "parameters": parameters}}, "image"),
        (std, common | {"name": f"{name} std", "colormap": "inferno", "contrast_limits": (0.0, max(high, 1e-12)),
                        "blending": "additive", "metadata": {"ppm_role": "std", "ppm_source": name, "parameters": parameters}}, "image"),
        (result["samples"], {"scale": (1.0,) * (extra + 1) + tuple(scale), "translate": (0.0,) * (extra + 1) + tuple(translate),
                             "name": f"{name} samples",
                             "metadata": {"ppm_role": "samples", "ppm_source": name, "parameters": parameters}}, "image"),
    ]
